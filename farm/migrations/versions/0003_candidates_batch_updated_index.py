"""candidates: an index on (batch_id, updated_at) for the near-duplicate check's "changed since" read

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_candidates_batch_updated", "candidates", ["batch_id", "updated_at"])


def downgrade() -> None:
    op.drop_index("ix_candidates_batch_updated", table_name="candidates")
