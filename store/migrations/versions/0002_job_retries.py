"""Job retries with backoff and a dead-letter state: jobs.run_after, jobs.max_attempts, (state, run_after) index;
listings.idempotency_key (unique per seller) so a retried upload can never create a second listing.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("run_after", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("max_attempts", sa.Integer(), nullable=False, server_default="3"))
    op.create_index("ix_jobs_state_run_after", "jobs", ["state", "run_after"])
    with op.batch_alter_table("listings") as batch:
        batch.add_column(sa.Column("idempotency_key", sa.String(128), nullable=True))
    op.create_index(
        "uq_listings_seller_idempotency", "listings", ["seller_id", "idempotency_key"], unique=True
    )


def downgrade() -> None:
    op.drop_index("uq_listings_seller_idempotency", "listings")
    with op.batch_alter_table("listings") as batch:
        batch.drop_column("idempotency_key")
    op.drop_index("ix_jobs_state_run_after", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("max_attempts")
        batch.drop_column("run_after")
