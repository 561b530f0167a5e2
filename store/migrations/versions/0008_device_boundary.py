"""Metering anchored at the store and signed seats (#20): usage_forks (two records for one chain position of
a device), listing_metering (per-listing offline budget), seat_activations (one device per seat).

Additive: three new tables, nothing existing changes.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_forks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("held", sa.JSON(), nullable=False),
        sa.Column("offered", sa.Text(), nullable=False),
        sa.Column("revoked", sa.JSON(), nullable=False),
        sa.Column("detected_at", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.device_id"], name="fk_usage_forks_device_id_devices"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_usage_forks"),
    )
    op.create_index("ix_usage_forks_device_id", "usage_forks", ["device_id"])
    op.create_table(
        "listing_metering",
        sa.Column("listing_id", sa.String(64), nullable=False),
        sa.Column("offline_runs", sa.Integer(), nullable=False),
        sa.Column("offline_hours", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["listing_id"], ["listings.id"], name="fk_listing_metering_listing_id_listings"
        ),
        sa.PrimaryKeyConstraint("listing_id", name="pk_listing_metering"),
    )
    op.create_table(
        "seat_activations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("license_id", sa.String(64), nullable=False),
        sa.Column("seat", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("token", sa.LargeBinary(), nullable=False),
        sa.Column("activated_at", sa.Integer(), nullable=False),
        sa.Column("revoked_at", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["license_id"], ["licenses.license_id"], name="fk_seat_activations_license_id_licenses"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_seat_activations"),
        sa.UniqueConstraint("license_id", "seat", name="uq_seat_activations_seat"),
        sa.UniqueConstraint("license_id", "device_id", name="uq_seat_activations_device"),
    )
    op.create_index("ix_seat_activations_license_id", "seat_activations", ["license_id"])


def downgrade() -> None:
    op.drop_index("ix_seat_activations_license_id", table_name="seat_activations")
    op.drop_table("seat_activations")
    op.drop_table("listing_metering")
    op.drop_index("ix_usage_forks_device_id", table_name="usage_forks")
    op.drop_table("usage_forks")
