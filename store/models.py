"""The store's relational schema (SQLAlchemy 2.x ORM). Alembic migrations in store/migrations create it.

Secrets never sit here in plaintext: API tokens are SHA-256 hashes, content keys are wrapped under the KEK."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ROLES = ("seller", "buyer", "builder", "admin")
BUILD_STATES = ("queued", "running", "done", "failed", "rejected")
JOB_STATES = ("queued", "running", "done", "failed", "dead")
# pending: packaging not finished yet; listed: at least one build is licensable; blocked: compliance gate
# said no (kept for appeal); failed: every build failed; rejected: an admin upheld the block; unpublished: the
# seller took it off the store (no new licenses; issued ones run out).
LISTING_STATES = ("pending", "listed", "blocked", "failed", "rejected", "unpublished")
# A version's own state: the same words, less "unpublished" (a listing is unpublished, not one of its versions).
VERSION_STATES = ("pending", "listed", "blocked", "failed", "rejected")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str | None] = mapped_column(String(256))
    failed_logins: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    locked_until: Mapped[int | None] = mapped_column(Integer)  # password login refused until then
    created_at: Mapped[int] = mapped_column(Integer)


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 hex of the token text
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, to tell tokens apart in a list
    role: Mapped[str] = mapped_column(String(16))  # the scope: what this token may do
    created_at: Mapped[int] = mapped_column(Integer)
    revoked_at: Mapped[int | None] = mapped_column(Integer)
    last_used_at: Mapped[int | None] = mapped_column(Integer)

    user: Mapped[User] = relationship()


class WebSession(Base):
    """A signed-in browser: the cookie carries a random id, this row (keyed by its SHA-256) says it is still
    valid. Deleting the row ends the session on every web process at its next request."""

    __tablename__ = "web_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    role: Mapped[str] = mapped_column(String(16))  # the role at sign-in: a role change ends the session
    created_at: Mapped[int] = mapped_column(Integer)
    last_seen_at: Mapped[int] = mapped_column(Integer)


class RateCounter(Base):
    """Requests counted per (action, caller) in fixed windows, shared by every web process through the database."""

    __tablename__ = "rate_counters"

    key: Mapped[str] = mapped_column(String(160), primary_key=True)  # "upload:token:12", "login:ip:10.0.0.7"
    window_start: Mapped[int] = mapped_column(Integer, primary_key=True)  # unix seconds
    hits: Mapped[int] = mapped_column(Integer)


class Listing(Base):
    """A product on the store: its name, seller, terms and visibility. What is sold lives in its versions."""

    __tablename__ = "listings"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # slug
    name: Mapped[str] = mapped_column(String(128))
    seller_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    # listed while any version is listed; otherwise the newest version's state (unpublished: the seller's call)
    status: Mapped[str] = mapped_column(String(16), index=True)
    visibility: Mapped[str] = mapped_column(String(16), default="public")
    eval_days: Mapped[int] = mapped_column(Integer, default=14)
    eval_runs: Mapped[int] = mapped_column(Integer, default=1000)
    eval_device_limit: Mapped[int] = mapped_column(Integer, default=3)
    price_per_seat: Mapped[int] = mapped_column(Integer, default=0)  # cents
    created_at: Mapped[int] = mapped_column(Integer)
    idempotency_key: Mapped[str | None] = mapped_column(String(128))  # the first upload's Idempotency-Key

    seller: Mapped[User] = relationship(foreign_keys=[seller_id])
    versions: Mapped[list[ListingVersion]] = relationship(
        back_populates="listing", order_by="ListingVersion.number"
    )
    builds: Mapped[list[Build]] = relationship(
        back_populates="listing", order_by="[Build.version_id, Build.target]"
    )  # every version's

    __table_args__ = (Index("uq_listings_seller_idempotency", "seller_id", "idempotency_key", unique=True),)

    @property
    def latest(self) -> ListingVersion:
        """The newest version, whatever its state."""
        return self.versions[-1]

    @property
    def current(self) -> ListingVersion:
        """The version buyers get unless they pin one: the newest listed version, else the newest."""
        listed = [v for v in self.versions if v.status == "listed"]
        return listed[-1] if listed else self.latest


class ListingVersion(Base):
    """One model published under a listing: its file, card, licence, compliance decision, targets and builds.
    Numbered 1, 2, ... per listing; licenses name the version they unlock, and a version once licensed stays."""

    __tablename__ = "listing_versions"
    __table_args__ = (
        UniqueConstraint("listing_id", "number"),
        Index("uq_listing_versions_listing_idempotency", "listing_id", "idempotency_key", unique=True),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    listing_id: Mapped[str] = mapped_column(ForeignKey("listings.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))  # VERSION_STATES
    license: Mapped[str] = mapped_column(String(256))
    card: Mapped[str | None] = mapped_column(Text)
    decision: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    targets: Mapped[list[str]] = mapped_column(JSON)  # what the seller asked for (re-queued on appeal)
    # Packager options per target ({"arm-cpu": {"min_agreement": "0.99"}}), carried to the packaging jobs.
    target_options: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    model_blob: Mapped[str] = mapped_column(String(80))
    model_sha256: Mapped[str] = mapped_column(String(71))
    model_format: Mapped[str] = mapped_column(String(16))
    model_size: Mapped[int] = mapped_column(Integer)
    calibration_blob: Mapped[str | None] = mapped_column(String(80))
    created_at: Mapped[int] = mapped_column(Integer)
    idempotency_key: Mapped[str | None] = mapped_column(String(128))  # the upload's Idempotency-Key
    reviewed_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    review_note: Mapped[str | None] = mapped_column(Text)

    listing: Mapped[Listing] = relationship(back_populates="versions")
    builds: Mapped[list[Build]] = relationship(back_populates="version", order_by="Build.target")


class Build(Base):
    __tablename__ = "builds"
    __table_args__ = (UniqueConstraint("version_id", "target"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    listing_id: Mapped[str] = mapped_column(ForeignKey("listings.id"), index=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("listing_versions.id"), index=True)
    target: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text)
    build_hash: Mapped[str | None] = mapped_column(String(71), unique=True)
    format: Mapped[str | None] = mapped_column(String(16))
    blob_key: Mapped[str | None] = mapped_column(String(80))  # the sealed container
    sealed_size: Mapped[int | None] = mapped_column(Integer)
    wrapped_cek: Mapped[bytes | None] = mapped_column(LargeBinary)  # under the KEK, never plaintext
    quality: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    quality_html_blob: Mapped[str | None] = mapped_column(String(80))
    build_metadata: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[int] = mapped_column(Integer)

    listing: Mapped[Listing] = relationship(back_populates="builds")
    version: Mapped[ListingVersion] = relationship(back_populates="builds")


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id"), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text)  # the seller-facing reason (store.services.job_failures)
    error_code: Mapped[str | None] = mapped_column(String(32))
    next_step: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3, server_default="3")
    run_after: Mapped[int | None] = mapped_column(Integer)  # a retry waits for its backoff to pass
    worker: Mapped[str | None] = mapped_column(String(128))  # host:pid holding the job while running
    heartbeat_at: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[int | None] = mapped_column(Integer)
    finished_at: Mapped[int | None] = mapped_column(Integer)

    build: Mapped[Build] = relationship()

    __table_args__ = (Index("ix_jobs_state_run_after", "state", "run_after"),)


class Device(Base):
    __tablename__ = "devices"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    cert_pem: Mapped[str] = mapped_column(Text)
    enrolled_at: Mapped[int] = mapped_column(Integer)

    owner: Mapped[User] = relationship()


class License(Base):
    __tablename__ = "licenses"
    __table_args__ = (
        # One eval license per (buyer, device, build): a re-request returns it, counters are never reset.
        Index(
            "uq_licenses_eval_once",
            "buyer_id",
            "device_id",
            "build_id",
            unique=True,
            sqlite_where=text("kind = 'eval'"),
            postgresql_where=text("kind = 'eval'"),
        ),
    )

    license_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    listing_id: Mapped[str] = mapped_column(ForeignKey("listings.id"), index=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id"), index=True)
    version: Mapped[int] = mapped_column(
        Integer, default=1, server_default="1"
    )  # the listing version it unlocks
    # The device key id the license is bound to: an enrolled device (eval) or a fleet device (production).
    device_id: Mapped[str | None] = mapped_column(String(64), index=True)
    fleet_key_id: Mapped[str | None] = mapped_column(String(64))
    buyer_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    seats: Mapped[int] = mapped_column(Integer, default=1)
    issued_at: Mapped[int] = mapped_column(Integer)
    not_after: Mapped[int | None] = mapped_column(Integer)
    max_runs: Mapped[int | None] = mapped_column(Integer)
    token: Mapped[bytes] = mapped_column(LargeBinary)  # signed; the CEK inside is HPKE-wrapped to the device
    revoked_at: Mapped[int | None] = mapped_column(Integer)

    listing: Mapped[Listing] = relationship()
    build: Mapped[Build] = relationship()


class UsageRecord(Base):
    __tablename__ = "usage"
    __table_args__ = (UniqueConstraint("device_id", "seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.device_id"))
    seq: Mapped[int] = mapped_column(Integer)
    license_id: Mapped[str] = mapped_column(String(64), index=True)
    build_hash: Mapped[str] = mapped_column(String(71))
    event: Mapped[str] = mapped_column(String(16))
    t: Mapped[int] = mapped_column(Integer)
    runs: Mapped[int] = mapped_column(Integer)
    line_hash: Mapped[str] = mapped_column(
        String(71)
    )  # sha256 tag of the signed line: the chain's next `prev`
    received_at: Mapped[int] = mapped_column(Integer)


class Revocation(Base):
    __tablename__ = "revocations"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    issued_at: Mapped[int] = mapped_column(Integer)
    revoked: Mapped[list[str]] = mapped_column(JSON)
    token: Mapped[bytes] = mapped_column(LargeBinary)


class IdempotentResponse(Base):
    __tablename__ = "idempotency"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    status: Mapped[int] = mapped_column(Integer)
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[int] = mapped_column(Integer)


class UsageFork(Base):
    """Two different signed records for one position of a device's usage-log chain: a restored or cloned
    device state. The device's licenses were revoked and its check-ins are refused from then on."""

    __tablename__ = "usage_forks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.device_id"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    held: Mapped[dict[str, Any]] = mapped_column(JSON)  # the record the store accepted first (its fields)
    offered: Mapped[str] = mapped_column(Text)  # the other record: the whole signed line, as uploaded
    revoked: Mapped[list[str]] = mapped_column(JSON)  # licenses revoked because of this fork
    detected_at: Mapped[int] = mapped_column(Integer)


class ListingMetering(Base):
    """A listing's offline budget for evaluation licenses (absent: the store's EVAL_OFFLINE_* defaults)."""

    __tablename__ = "listing_metering"

    listing_id: Mapped[str] = mapped_column(ForeignKey("listings.id"), primary_key=True)
    offline_runs: Mapped[int] = mapped_column(Integer)
    offline_hours: Mapped[int] = mapped_column(Integer)


class SeatActivation(Base):
    """One device holding one seat of a fleet production license (seat numbers 1..seats, each once)."""

    __tablename__ = "seat_activations"
    __table_args__ = (
        UniqueConstraint("license_id", "seat", name="uq_seat_activations_seat"),
        UniqueConstraint("license_id", "device_id", name="uq_seat_activations_device"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    license_id: Mapped[str] = mapped_column(ForeignKey("licenses.license_id"), index=True)
    seat: Mapped[int] = mapped_column(Integer)
    device_id: Mapped[str] = mapped_column(String(64))
    token: Mapped[bytes] = mapped_column(LargeBinary)  # the signed activation
    activated_at: Mapped[int] = mapped_column(Integer)
    revoked_at: Mapped[int | None] = mapped_column(Integer)
