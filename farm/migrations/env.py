"""Alembic environment: runs on the engine farm.db hands over (no alembic.ini needed)."""

from alembic import context

from farm.db import Base

config = context.config
engine = config.attributes["engine"]

with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
