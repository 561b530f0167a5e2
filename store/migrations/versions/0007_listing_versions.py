"""Listing versions: the model, card, licence, decision, targets and calibration move from listings to
listing_versions (every existing listing becomes its version 1); builds are unique per (version, target);
licenses name the version they unlock.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# The listing columns that now belong to each version (in listing_versions under the same names).
MOVED = (
    "license",
    "card",
    "decision",
    "targets",
    "target_options",
    "model_blob",
    "model_sha256",
    "model_format",
    "model_size",
    "calibration_blob",
    "idempotency_key",
    "reviewed_by",
    "review_note",
)


def upgrade() -> None:
    op.create_table(
        "listing_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("listing_id", sa.String(64), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("license", sa.String(256), nullable=False),
        sa.Column("card", sa.Text(), nullable=True),
        sa.Column("decision", sa.JSON(), nullable=True),
        sa.Column("targets", sa.JSON(), nullable=False),
        sa.Column("target_options", sa.JSON(), nullable=True),
        sa.Column("model_blob", sa.String(80), nullable=False),
        sa.Column("model_sha256", sa.String(71), nullable=False),
        sa.Column("model_format", sa.String(16), nullable=False),
        sa.Column("model_size", sa.Integer(), nullable=False),
        sa.Column("calibration_blob", sa.String(80), nullable=True),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(128), nullable=True),
        sa.Column("reviewed_by", sa.Integer(), nullable=True),
        sa.Column("review_note", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["listing_id"], ["listings.id"], name="fk_listing_versions_listing_id_listings"
        ),
        sa.ForeignKeyConstraint(["reviewed_by"], ["users.id"], name="fk_listing_versions_reviewed_by_users"),
        sa.PrimaryKeyConstraint("id", name="pk_listing_versions"),
        sa.UniqueConstraint("listing_id", "number", name="uq_listing_versions_listing_id_number"),
    )
    op.create_index("ix_listing_versions_listing_id", "listing_versions", ["listing_id"])
    op.create_index(
        "uq_listing_versions_listing_idempotency",
        "listing_versions",
        ["listing_id", "idempotency_key"],
        unique=True,
    )
    moved = ", ".join(MOVED)
    # An unpublished listing's one version was listed: unpublishing is the listing's state, not the version's.
    op.execute(
        f"INSERT INTO listing_versions (listing_id, number, status, created_at, {moved}) "
        "SELECT id, 1, CASE WHEN status = 'unpublished' THEN 'listed' ELSE status END, created_at, "
        f"{moved} FROM listings"
    )

    with op.batch_alter_table("builds") as batch:
        batch.add_column(sa.Column("version_id", sa.Integer(), nullable=True))
    op.execute(
        "UPDATE builds SET version_id = "
        "(SELECT v.id FROM listing_versions v WHERE v.listing_id = builds.listing_id AND v.number = 1)"
    )
    with op.batch_alter_table("builds") as batch:
        batch.alter_column("version_id", existing_type=sa.Integer(), nullable=False)
        batch.drop_constraint("uq_builds_listing_id_target", type_="unique")
        batch.create_unique_constraint("uq_builds_version_id_target", ["version_id", "target"])
        batch.create_foreign_key(
            "fk_builds_version_id_listing_versions", "listing_versions", ["version_id"], ["id"]
        )
        batch.create_index("ix_builds_version_id", ["version_id"])

    with op.batch_alter_table("licenses") as batch:
        batch.add_column(sa.Column("version", sa.Integer(), nullable=False, server_default="1"))

    with op.batch_alter_table("listings") as batch:
        batch.drop_constraint("fk_listings_reviewed_by_users", type_="foreignkey")
        for column in MOVED:
            if column != "idempotency_key":  # the first upload's key stays on the listing too
                batch.drop_column(column)


def downgrade() -> None:
    """Back to one model per listing: refused while any listing has a second version (it would be lost)."""
    bind = op.get_bind()
    several = bind.execute(sa.text("SELECT count(*) FROM listing_versions WHERE number > 1")).scalar()
    if several:
        raise RuntimeError(f"{several} listing version(s) beyond the first exist; downgrade would lose them")
    with op.batch_alter_table("listings") as batch:
        batch.add_column(sa.Column("license", sa.String(256), nullable=True))
        batch.add_column(sa.Column("card", sa.Text(), nullable=True))
        batch.add_column(sa.Column("decision", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("targets", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("target_options", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("model_blob", sa.String(80), nullable=True))
        batch.add_column(sa.Column("model_sha256", sa.String(71), nullable=True))
        batch.add_column(sa.Column("model_format", sa.String(16), nullable=True))
        batch.add_column(sa.Column("model_size", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("calibration_blob", sa.String(80), nullable=True))
        batch.add_column(sa.Column("reviewed_by", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("review_note", sa.Text(), nullable=True))
    for column in MOVED:
        if column != "idempotency_key":
            op.execute(
                f"UPDATE listings SET {column} = "
                f"(SELECT v.{column} FROM listing_versions v WHERE v.listing_id = listings.id)"
            )
    with op.batch_alter_table("listings") as batch:
        for column in ("license", "targets", "model_blob", "model_sha256", "model_format", "model_size"):
            batch.alter_column(column, nullable=False)
        batch.create_foreign_key("fk_listings_reviewed_by_users", "users", ["reviewed_by"], ["id"])
    with op.batch_alter_table("licenses") as batch:
        batch.drop_column("version")
    with op.batch_alter_table("builds") as batch:
        batch.drop_index("ix_builds_version_id")
        batch.drop_constraint("fk_builds_version_id_listing_versions", type_="foreignkey")
        batch.drop_constraint("uq_builds_version_id_target", type_="unique")
        batch.create_unique_constraint("uq_builds_listing_id_target", ["listing_id", "target"])
        batch.drop_column("version_id")
    op.drop_index("uq_listing_versions_listing_idempotency", table_name="listing_versions")
    op.drop_index("ix_listing_versions_listing_id", table_name="listing_versions")
    op.drop_table("listing_versions")
