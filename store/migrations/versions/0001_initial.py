"""Initial schema: users, tokens, listings, builds, jobs, devices, licenses, usage, revocations, idempotency.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("password_hash", sa.String(256), nullable=True),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("name", name="uq_users_name"),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.Column("revoked_at", sa.Integer(), nullable=True),
        sa.Column("last_used_at", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_api_tokens_user_id_users"),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
    )
    op.create_index("ix_api_tokens_user_id", "api_tokens", ["user_id"])
    op.create_table(
        "listings",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("seller_id", sa.Integer(), nullable=False),
        sa.Column("license", sa.String(256), nullable=False),
        sa.Column("card", sa.Text(), nullable=True),
        sa.Column("decision", sa.JSON(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("visibility", sa.String(16), nullable=False),
        sa.Column("targets", sa.JSON(), nullable=False),
        sa.Column("eval_days", sa.Integer(), nullable=False),
        sa.Column("eval_runs", sa.Integer(), nullable=False),
        sa.Column("eval_device_limit", sa.Integer(), nullable=False),
        sa.Column("price_per_seat", sa.Integer(), nullable=False),
        sa.Column("model_blob", sa.String(80), nullable=False),
        sa.Column("model_sha256", sa.String(71), nullable=False),
        sa.Column("model_format", sa.String(16), nullable=False),
        sa.Column("model_size", sa.Integer(), nullable=False),
        sa.Column("calibration_blob", sa.String(80), nullable=True),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.Column("reviewed_by", sa.Integer(), nullable=True),
        sa.Column("review_note", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["seller_id"], ["users.id"], name="fk_listings_seller_id_users"),
        sa.ForeignKeyConstraint(["reviewed_by"], ["users.id"], name="fk_listings_reviewed_by_users"),
        sa.PrimaryKeyConstraint("id", name="pk_listings"),
    )
    op.create_index("ix_listings_seller_id", "listings", ["seller_id"])
    op.create_index("ix_listings_status", "listings", ["status"])
    op.create_table(
        "builds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("listing_id", sa.String(64), nullable=False),
        sa.Column("target", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("build_hash", sa.String(71), nullable=True),
        sa.Column("format", sa.String(16), nullable=True),
        sa.Column("blob_key", sa.String(80), nullable=True),
        sa.Column("sealed_size", sa.Integer(), nullable=True),
        sa.Column("wrapped_cek", sa.LargeBinary(), nullable=True),
        sa.Column("quality", sa.JSON(), nullable=True),
        sa.Column("quality_html_blob", sa.String(80), nullable=True),
        sa.Column("build_metadata", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["listing_id"], ["listings.id"], name="fk_builds_listing_id_listings"),
        sa.PrimaryKeyConstraint("id", name="pk_builds"),
        sa.UniqueConstraint("listing_id", "target", name="uq_builds_listing_id_target"),
        sa.UniqueConstraint("build_hash", name="uq_builds_build_hash"),
    )
    op.create_index("ix_builds_listing_id", "builds", ["listing_id"])
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("build_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(128), nullable=True),
        sa.Column("heartbeat_at", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.Integer(), nullable=True),
        sa.Column("finished_at", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["build_id"], ["builds.id"], name="fk_jobs_build_id_builds"),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
    )
    op.create_index("ix_jobs_build_id", "jobs", ["build_id"])
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_table(
        "devices",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("cert_pem", sa.Text(), nullable=False),
        sa.Column("enrolled_at", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["owner_id"], ["users.id"], name="fk_devices_owner_id_users"),
        sa.PrimaryKeyConstraint("device_id", name="pk_devices"),
    )
    op.create_index("ix_devices_owner_id", "devices", ["owner_id"])
    op.create_table(
        "licenses",
        sa.Column("license_id", sa.String(64), nullable=False),
        sa.Column("listing_id", sa.String(64), nullable=False),
        sa.Column("build_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=True),
        sa.Column("fleet_key_id", sa.String(64), nullable=True),
        sa.Column("buyer_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("seats", sa.Integer(), nullable=False),
        sa.Column("issued_at", sa.Integer(), nullable=False),
        sa.Column("not_after", sa.Integer(), nullable=True),
        sa.Column("max_runs", sa.Integer(), nullable=True),
        sa.Column("token", sa.LargeBinary(), nullable=False),
        sa.Column("revoked_at", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["listing_id"], ["listings.id"], name="fk_licenses_listing_id_listings"),
        sa.ForeignKeyConstraint(["build_id"], ["builds.id"], name="fk_licenses_build_id_builds"),
        sa.ForeignKeyConstraint(["buyer_id"], ["users.id"], name="fk_licenses_buyer_id_users"),
        sa.PrimaryKeyConstraint("license_id", name="pk_licenses"),
    )
    op.create_index("ix_licenses_listing_id", "licenses", ["listing_id"])
    op.create_index("ix_licenses_build_id", "licenses", ["build_id"])
    op.create_index("ix_licenses_device_id", "licenses", ["device_id"])
    op.create_index("ix_licenses_buyer_id", "licenses", ["buyer_id"])
    op.create_index(
        "uq_licenses_eval_once",
        "licenses",
        ["buyer_id", "device_id", "build_id"],
        unique=True,
        sqlite_where=sa.text("kind = 'eval'"),
        postgresql_where=sa.text("kind = 'eval'"),
    )
    op.create_table(
        "usage",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("license_id", sa.String(64), nullable=False),
        sa.Column("build_hash", sa.String(71), nullable=False),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("t", sa.Integer(), nullable=False),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("line_hash", sa.String(71), nullable=False),
        sa.Column("received_at", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.device_id"], name="fk_usage_device_id_devices"),
        sa.PrimaryKeyConstraint("id", name="pk_usage"),
        sa.UniqueConstraint("device_id", "seq", name="uq_usage_device_id_seq"),
    )
    op.create_index("ix_usage_license_id", "usage", ["license_id"])
    op.create_table(
        "revocations",
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("issued_at", sa.Integer(), nullable=False),
        sa.Column("revoked", sa.JSON(), nullable=False),
        sa.Column("token", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("version", name="pk_revocations"),
    )
    op.create_table(
        "idempotency",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_idempotency_user_id_users"),
        sa.PrimaryKeyConstraint("user_id", "key", name="pk_idempotency"),
    )


def downgrade() -> None:
    for table in (
        "idempotency",
        "revocations",
        "usage",
        "licenses",
        "devices",
        "jobs",
        "builds",
        "listings",
        "api_tokens",
        "users",
    ):
        op.drop_table(table)
