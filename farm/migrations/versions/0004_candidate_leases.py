"""candidates: the lease of the worker process working on each (generation, holder, expiry)

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("candidates", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_token", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("lease_owner", sa.String(length=250), nullable=True))
        batch_op.add_column(sa.Column("lease_expires_at", sa.DateTime(), nullable=True))
    op.create_index("ix_candidates_lease_expires", "candidates", ["lease_expires_at"])


def downgrade() -> None:
    op.drop_index("ix_candidates_lease_expires", table_name="candidates")
    with op.batch_alter_table("candidates", schema=None) as batch_op:
        batch_op.drop_column("lease_expires_at")
        batch_op.drop_column("lease_owner")
        batch_op.drop_column("lease_token")
