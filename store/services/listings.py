# Why this is one module: uploads, versions, search and views of one aggregate (a listing and its versions) share the same validation helpers and transaction rules.
"""Listings: upload validation (every problem at once), the compliance gate, job creation, search, views.

An upload either becomes a listing with its jobs or leaves nothing behind (no blob, no row)."""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlalchemy.orm import Session

from edgemart.core.errors import (
    ConflictError,
    EdgemartError,
    ForbiddenError,
    NotFoundError,
    Refusal,
    UsageError,
    with_prefix,
)
from edgemart.core.fileio import fault_point
from store.blobs import new_blob_id
from store.context import StoreContext
from store.models import Build, Job, License, Listing, ListingVersion, User
from store.services import confined

_SLUG_STRIP = re.compile(r"[^a-z0-9]+")
VISIBILITIES = ("public", "private")
MAX_NAME = 128


class UploadProblems(UsageError):
    """The upload was refused; every problem found is listed."""

    http_status = 422
    code = "invalid_upload"


class Blocked(Refusal):
    """The compliance gate blocked this upload; it is kept for appeal but never packaged or listed."""

    code = "blocked"


@dataclass
class Problem:
    field: str
    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"field": self.field, "code": self.code, "message": self.message}


@dataclass
class UploadForm:
    """An upload as the API or the web form received it (streams are read once)."""

    name: str | None = None
    license: str | None = None
    card: BinaryIO | bytes | str | None = None
    targets: str | list[str] | None = None
    visibility: str | None = None
    eval_days: str | int | None = None
    eval_runs: str | int | None = None
    price_per_seat: str | int | None = None
    model: BinaryIO | None = None
    calibration: BinaryIO | None = None
    options: str | dict[str, Any] | None = (
        None  # per target: {"arm-cpu": {"min_agreement": "0.99"}} (or JSON)
    )
    idempotency_key: str | None = None  # a retried upload with the same key gets the first one's listing
    listing: str | None = None  # a new version of this listing (the seller's) instead of a new listing
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class UploadResult:
    listing: Listing
    job_ids: list[str]
    blocked: bool
    version: ListingVersion


def slugify(name: str) -> str:
    return _SLUG_STRIP.sub("-", name.lower()).strip("-")[:64].strip("-")


def new_job_id() -> str:
    return "job_" + secrets.token_hex(12)


# ------------------------------------------------------------------------------------------ validation


def _check_license_syntax(expression: str) -> str | None:
    """None if ``expression`` parses as an SPDX expression (known or LicenseRef keys), else the message.

    Whether the licence allows selling is the compliance gate's decision, not this check's."""
    from license_expression import ExpressionError, get_spdx_licensing

    licensing = get_spdx_licensing()
    try:
        parsed = licensing.parse(expression, validate=False)
    except ExpressionError as exc:
        return f"invalid SPDX license expression {expression!r}: {exc}"
    if parsed is None:
        return "license expression is empty"
    return None


def _int_field(problems: list[Problem], name: str, value: Any, default: int, lo: int, hi: int) -> int:
    if value in (None, ""):
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        problems.append(
            Problem(name, "not_an_integer", f"{name} must be an integer, got {str(value)[:40]!r}")
        )
        return default
    if not lo <= number <= hi:
        problems.append(Problem(name, "out_of_range", f"{name} must be between {lo} and {hi}, got {number}"))
    return number


def _read_text(
    problems: list[Problem], name: str, value: BinaryIO | bytes | str | None, limit: int
) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        data = value.encode("utf-8", "surrogateescape")
    elif isinstance(value, bytes):
        data = value
    else:
        data = value.read(limit + 1)
    if len(data) > limit:
        problems.append(Problem(name, "too_large", f"{name} exceeds {limit} bytes"))
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(Problem(name, "not_utf8", f"{name} is not UTF-8 text (byte {exc.start})"))
        return None
    return _clean_text(problems, name, text, multiline=True) or None


# C0 controls and DEL/C1 are refused (NUL cannot even be stored in PostgreSQL text); a card keeps tab, LF
# and CR. Bidirectional overrides and isolates are refused in one-line fields: they let a name read as
# another ("evil\u202egnp.txt").
_MULTILINE_OK = frozenset("\t\n\r")
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _clean_text(problems: list[Problem], field_name: str, text: str, *, multiline: bool) -> str | None:
    """NFC-normalised `text`; None after a `control_character` problem naming the first offending character."""
    import unicodedata

    for i, ch in enumerate(text):
        if multiline and ch in _MULTILINE_OK:
            continue
        if unicodedata.category(ch) in ("Cc", "Cs") or (not multiline and ch in _BIDI_CONTROLS):
            problems.append(
                Problem(
                    field_name,
                    "control_character",
                    f"{field_name} contains control character U+{ord(ch):04X} at position {i}",
                )
            )
            return None
    return unicodedata.normalize("NFC", text)


def _clean_line(problems: list[Problem], field_name: str, value: str | None) -> str | None:
    return _clean_text(problems, field_name, (value or "").strip(), multiline=False)


def _targets(problems: list[Problem], raw: str | list[str] | None) -> list[str]:
    import packagers

    items = raw if isinstance(raw, list) else (raw or "").split(",")
    targets = list(dict.fromkeys(t.strip() for t in items if t and t.strip()))
    if not targets:
        problems.append(
            Problem("targets", "missing", f"choose at least one target: {', '.join(packagers.TARGETS)}")
        )
    for t in targets:
        if t not in packagers.TARGETS:
            problems.append(
                Problem(
                    "targets",
                    "unknown_target",
                    f"unknown target {t[:40]!r}; known: {', '.join(packagers.TARGETS)}",
                )
            )
    return targets


MAX_OPTIONS_BYTES = 16 * 1024


def _target_options(
    problems: list[Problem], raw: str | dict[str, Any] | None, targets: list[str]
) -> dict[str, Any]:
    """Per-target packager options, each checked by its target's typed options dataclass."""
    import json

    import packagers

    if raw in (None, "", {}):
        return {}
    if isinstance(raw, str):
        if len(raw) > MAX_OPTIONS_BYTES:
            problems.append(Problem("options", "too_large", f"options exceed {MAX_OPTIONS_BYTES} bytes"))
            return {}
        try:
            raw = json.loads(raw)
        except ValueError:
            problems.append(
                Problem("options", "not_json", 'options must be JSON: {"TARGET": {"KEY": "VALUE"}}')
            )
            return {}
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        problems.append(Problem("options", "invalid", 'options must map each target to {"KEY": "VALUE"}'))
        return {}
    out: dict[str, Any] = {}
    for target, values in raw.items():
        if target not in targets:
            problems.append(
                Problem(
                    "options",
                    "unknown_target",
                    f"options name target {str(target)[:40]!r}, which is not chosen",
                )
            )
            continue
        try:
            packagers.get_packager(target, values)
        except UsageError as exc:
            problems.append(Problem("options", "invalid_option", exc.message))
            continue
        out[target] = {str(k): v for k, v in values.items()}
    return out


def _with_card_declarations(
    front_matter: dict[str, Any], targets: list[str], target_options: dict[str, Any]
) -> dict[str, Any]:
    """The card's `fixed` and `state` declarations as every target's options, unless the seller gave them."""
    import packagers

    declared = packagers.card_contract_options(front_matter)
    if not declared:
        return target_options
    return {t: {**declared, **target_options.get(t, {})} for t in targets if t in packagers.TARGETS}


# ------------------------------------------------------------------------------------------ upload


def create_listing(ctx: StoreContext, session: Session, seller: User, form: UploadForm) -> UploadResult:
    """Validate, run the compliance gate, then store a new listing with its version 1, or (``form.listing``)
    a new version of the seller's listing, and one packaging job per target.

    A name whose listing is the seller's own and has nothing listed or packaging (every version blocked,
    failed or rejected) is not used up: the upload becomes that listing's next version.

    Raises UploadProblems (422, all problems); a blocked version is kept for appeal (``result.blocked``).
    On any failure the blobs this call created are deleted and the transaction is rolled back."""
    if seller.role not in ("seller", "admin"):
        raise ForbiddenError("only sellers can upload models")
    problems: list[Problem] = []
    created: list[str] = []
    try:
        listing, name = _upload_listing(session, seller, form, problems)
        previous = listing.latest if listing is not None else None
        terms = _listing_terms(problems, form, listing)
        spec = _version_spec(ctx, problems, form, created, previous=previous)
        _refuse_if(problems, "upload refused")
        decision = _compliance_decision(ctx, spec)
        blocked = decision.get("outcome") == "block"
        now = ctx.now()
        if listing is None:
            listing = Listing(
                id=slugify(name),
                seller_id=seller.id,
                status="pending",
                eval_device_limit=int(ctx.config["EVAL_DEVICE_LIMIT"]),
                created_at=now,
                idempotency_key=form.idempotency_key,
            )
            session.add(listing)
        if name:
            listing.name = name
        for key, value in terms.items():
            setattr(listing, key, value)
        version = ListingVersion(
            listing=listing,
            number=(previous.number + 1) if previous is not None else 1,
            status="blocked" if blocked else "pending",
            decision=decision,
            created_at=now,
            idempotency_key=form.idempotency_key,
            **spec.columns(),
        )
        session.add(version)
        settle(listing)
        fault_point("store", "upload", "before_commit")  # tests/faults: a crash between blob and row
        try:
            job_ids = (
                []
                if blocked
                else add_build_jobs(
                    session, version, spec.targets, now=now, max_attempts=int(ctx.config["JOB_MAX_ATTEMPTS"])
                )
            )
            session.commit()
        except DBIntegrityError:
            # A concurrent upload took the name or the version number, or a concurrent retry (same key) won.
            session.rollback()
            raise _lost_race(session, seller, listing.id, form.idempotency_key) from None
    except BaseException:
        session.rollback()
        for key in created:
            ctx.blobs.delete(key)
        raise
    for job_id in job_ids:
        ctx.queue.enqueue(job_id)
    return UploadResult(listing, job_ids, blocked, version)


def _refuse_if(problems: list[Problem], what: str) -> None:
    """UploadProblems (422) listing every problem, when there are any."""
    if problems:
        raise UploadProblems(
            f"{what}: " + "; ".join(p.message for p in problems), details=[p.to_dict() for p in problems]
        )


def _upload_listing(
    session: Session, seller: User, form: UploadForm, problems: list[Problem]
) -> tuple[Listing | None, str]:
    """The listing an upload adds a version to (None: a new listing) and the display name it sets ("": keep)."""
    if form.listing is not None:
        listing = get_owned(session, form.listing, seller)
        _not_a_retry(session, seller, form)
        if listing.status == "unpublished":
            raise ConflictError(f"listing {listing.id} is unpublished; it takes no new versions")
        name = _listing_name(problems, form.name) if form.name not in (None, "") else ""
        return listing, name
    name = _listing_name(problems, form.name)
    existing = session.get(Listing, slugify(name)) if name else None
    if existing is None:
        return None, name
    # A retry whose key lookup (in the view) ran before the first attempt committed meets the first
    # attempt's listing here: it is that upload, not a name clash.
    _not_a_retry(session, seller, form)
    if existing.seller_id == seller.id and name_is_free(existing):
        return existing, name
    problems.append(
        Problem("name", "name_taken", f"a listing {existing.id!r} already exists; choose another name")
    )
    return None, name


def name_is_free(listing: Listing) -> bool:
    """Whether an upload under ``listing``'s name may become its next version: nothing of it is listed or
    being packaged (a blocked, failed or rejected upload does not use up its name) and it is not unpublished."""
    return listing.status != "unpublished" and all(
        v.status in ("blocked", "failed", "rejected") for v in listing.versions
    )


def _not_a_retry(session: Session, seller: User, form: UploadForm) -> None:
    if form.idempotency_key is not None:
        existing = by_idempotency_key(session, seller, form.idempotency_key)
        if existing is not None:
            raise DuplicateUpload(existing)


def _listing_name(problems: list[Problem], value: str | None) -> str:
    name = _clean_line(problems, "name", value)
    if name is None:
        return ""
    if not name:
        problems.append(Problem("name", "missing", "name is required"))
    elif len(name) > MAX_NAME:
        problems.append(Problem("name", "too_long", f"name must be at most {MAX_NAME} characters"))
    elif not slugify(name):
        problems.append(Problem("name", "no_slug", "name must contain letters or digits"))
    else:
        return name
    return ""


def _listing_terms(problems: list[Problem], form: UploadForm, listing: Listing | None) -> dict[str, Any]:
    """Visibility and evaluation and seat terms: a new version keeps the listing's unless the form sets them."""
    visibility = (form.visibility or (listing.visibility if listing else "public")).strip()
    if visibility not in VISIBILITIES:
        problems.append(
            Problem("visibility", "invalid", f"visibility must be one of {', '.join(VISIBILITIES)}")
        )
    return {
        "visibility": visibility,
        "eval_days": _int_field(
            problems, "eval_days", form.eval_days, listing.eval_days if listing else 14, 1, 365
        ),
        "eval_runs": _int_field(
            problems, "eval_runs", form.eval_runs, listing.eval_runs if listing else 1000, 1, 10_000_000
        ),
        "price_per_seat": _int_field(
            problems,
            "price_per_seat",
            form.price_per_seat,
            listing.price_per_seat if listing else 0,
            0,
            10**9,
        ),
    }


@dataclass
class VersionSpec:
    """What one version is made of, checked: its licence, card, targets and options, and its stored files."""

    license: str
    card: str | None
    targets: list[str]
    target_options: dict[str, Any]
    model: bytes | None
    model_put: Any
    model_format: str
    calibration_put: Any

    def columns(self) -> dict[str, Any]:
        return {
            "license": self.license,
            "card": self.card,
            "targets": self.targets,
            "target_options": self.target_options,
            "model_blob": self.model_put.key,
            "model_sha256": "sha256:" + self.model_put.sha256,
            "model_format": self.model_format,
            "model_size": self.model_put.size,
            "calibration_blob": self.calibration_put.key if self.calibration_put else None,
        }


def _version_spec(
    ctx: StoreContext,
    problems: list[Problem],
    form: UploadForm,
    created: list[str],
    *,
    previous: ListingVersion | None,
) -> VersionSpec:
    """Check an upload's version fields, storing its model and calibration (their keys go to ``created``).
    A new version keeps the previous one's licence and card, and its targets and options, unless the form
    gives them; calibration samples belong to one upload and are never carried over."""

    cfg = ctx.config
    if previous is not None and form.license in (None, ""):
        license_expr = previous.license
    else:
        license_expr = _license_expression(problems, form.license)
    if previous is not None and form.targets in (None, "", []):
        targets = list(previous.targets)
        target_options = (
            _target_options(problems, form.options, targets)
            if form.options
            else dict(previous.target_options or {})
        )
    else:
        targets = _targets(problems, form.targets)
        target_options = _target_options(problems, form.options, targets)

    if previous is not None and form.card is None:
        card = previous.card
    else:
        card = _read_text(problems, "card", form.card, cfg["MAX_CARD_BYTES"])
        if card is not None:
            from licenses.card import parse_model_card

            try:
                declared = parse_model_card(card).raw
                target_options = _with_card_declarations(declared, targets, target_options)
            except UsageError as exc:
                problems.append(Problem("card", "invalid_card", with_prefix("model card", exc.message)))

    model_bytes: bytes | None = None
    model_format = ""
    if form.model is None:
        problems.append(Problem("model", "missing", "model file is required"))
    else:
        model_bytes = _read_upload(problems, "model", form.model, int(cfg["MAX_UPLOAD_BYTES"]))
        if model_bytes is not None:
            try:
                model_format = confined.inspect(ctx, model_bytes)["format"]
            except UsageError as exc:
                problems.append(Problem("model", "invalid_model", with_prefix("model", exc.message)))
    calibration = _checked_calibration(
        ctx, problems, form.calibration, model_bytes if model_format else None, targets, target_options
    )
    # Seller bytes are stored only once everything is checked: a refused upload never makes a blob.
    model_put = _put_new(ctx, model_bytes, created) if not problems else None
    calibration_put = _put_new(ctx, calibration, created) if not problems else None
    return VersionSpec(
        license_expr, card, targets, target_options, model_bytes, model_put, model_format, calibration_put
    )


def _license_expression(problems: list[Problem], value: str | None) -> str:
    license_expr = _clean_line(problems, "license", value)
    if license_expr is None:
        return ""
    if not license_expr:
        problems.append(Problem("license", "missing", "license (an SPDX expression) is required"))
    elif len(license_expr) > 256:
        problems.append(Problem("license", "too_long", "license expression must be at most 256 characters"))
    elif (msg := _check_license_syntax(license_expr)) is not None:
        problems.append(Problem("license", "invalid_license", msg))
    return license_expr


def _read_upload(problems: list[Problem], field_name: str, stream: BinaryIO, limit: int) -> bytes | None:
    """The part's bytes, or a `too_large` problem past `limit`."""
    out = bytearray()
    while chunk := stream.read(1 << 20):  # chunked: read(limit) would allocate the whole limit at once
        out += chunk
        if len(out) > limit:
            problems.append(Problem(field_name, "too_large", f"{field_name} exceeds {limit} bytes"))
            return None
    return bytes(out)


def _checked_calibration(
    ctx: StoreContext,
    problems: list[Problem],
    stream: BinaryIO | None,
    model: bytes | None = None,
    targets: list[str] | None = None,
    target_options: dict[str, Any] | None = None,
) -> bytes | None:
    """Uploaded samples, read and checked in the sandbox, and (given the model) bound to it by each chosen
    target's sample contract: the same miss for several targets is listed once. None when none were sent
    or they are refused."""
    if stream is None:
        return None
    data = _read_upload(problems, "calibration", stream, int(ctx.config["MAX_UPLOAD_BYTES"]))
    if data is None:
        return None
    try:
        checked = confined.check_samples(
            ctx, data, model=model, targets=targets, target_options=target_options
        )
    except UsageError as exc:
        problems.append(
            Problem("calibration", "invalid_calibration", with_prefix("calibration", exc.message))
        )
        return None
    for message, names in checked["fit_problems"]:
        text = message if len(names) == len(targets or []) else f"{', '.join(names)}: {message}"
        problems.append(Problem("calibration", "samples_do_not_fit", text))
    return data if not checked["fit_problems"] else None


def _put_new(ctx: StoreContext, data: bytes | None, created: list[str]) -> Any:
    """A blob of its own for checked upload bytes (not content-addressed: deleting it when this upload
    fails later can never take a blob from under a concurrent one); its key goes to ``created``."""
    if data is None:
        return None
    put = ctx.blobs.put_bytes(data, key=new_blob_id())
    if put.created:
        created.append(put.key)
    return put


def _store_calibration(
    ctx: StoreContext, problems: list[Problem], stream: BinaryIO | None, created: list[str]
) -> Any:
    """Checked calibration samples stored in a blob of their own (None when none were sent or refused)."""
    data = _checked_calibration(ctx, problems, stream)
    return _put_new(ctx, data, created) if not problems else None


def _compliance_decision(ctx: StoreContext, spec: VersionSpec) -> dict[str, Any]:
    assert spec.model is not None
    return confined.gate(ctx, spec.model, card=spec.card, license=spec.license)


def settle(listing: Listing) -> None:
    """The listing's status from its versions': listed while any version is listed, else the newest
    version's own state. An unpublished listing stays unpublished (issued licenses run out)."""
    if listing.status == "unpublished" or not listing.versions:
        return
    listed = any(v.status == "listed" for v in listing.versions)
    listing.status = "listed" if listed else listing.latest.status


class DuplicateUpload(EdgemartError):
    """A retry of an upload that already succeeded (same Idempotency-Key): answer with that version."""

    def __init__(self, version: ListingVersion) -> None:
        super().__init__(
            f"upload already received as version {version.number} of listing {version.listing_id}"
        )
        self.version = version
        self.listing = version.listing


def _lost_race(session: Session, seller: User, slug: str, key: str | None) -> EdgemartError:
    if key is not None:
        existing = by_idempotency_key(session, seller, key)
        if existing is not None:
            return DuplicateUpload(existing)
    return ConflictError(
        f"listing {slug!r} was just created or given a new version by another upload; try again"
    )


def by_idempotency_key(session: Session, seller: User, key: str) -> ListingVersion | None:
    return session.scalar(
        select(ListingVersion)
        .join(Listing, ListingVersion.listing_id == Listing.id)
        .where(Listing.seller_id == seller.id, ListingVersion.idempotency_key == key)
        .limit(1)
    )


def job_ids_of(
    session: Session, listing: Listing, *, open_only: bool = False, version: ListingVersion | None = None
) -> list[str]:
    """The listing's job ids, oldest first; ``open_only``: those queued or running (what its page follows);
    ``version``: only that version's."""
    stmt = select(Job.id).join(Build, Job.build_id == Build.id).where(Build.listing_id == listing.id)
    if open_only:
        stmt = stmt.where(Job.state.in_(("queued", "running")))
    if version is not None:
        stmt = stmt.where(Build.version_id == version.id)
    return list(session.scalars(stmt.order_by(Job.created_at, Job.id)))


def add_build_jobs(
    session: Session, version: ListingVersion, targets: list[str], *, now: int, max_attempts: int = 3
) -> list[str]:
    job_ids = []
    for target in targets:
        build = Build(
            listing=version.listing,
            version=version,
            target=target,
            status="queued",
            progress=0.0,
            message="queued",
            created_at=now,
            updated_at=now,
        )
        session.add(build)
        session.flush()
        job = Job(
            id=new_job_id(),
            kind="package",
            build_id=build.id,
            state="queued",
            progress=0.0,
            message="queued",
            attempts=0,
            max_attempts=max_attempts,
            created_at=now,
        )
        session.add(job)
        job_ids.append(job.id)
    session.flush()
    return job_ids


# ------------------------------------------------------------------------------------------ reading


def can_see(listing: Listing, user: User | None) -> bool:
    if user is not None and (user.role == "admin" or user.id == listing.seller_id):
        return True
    return listing.status == "listed" and listing.visibility == "public"


def get_visible(session: Session, listing_id: str, user: User | None) -> Listing:
    listing = (
        session.get(Listing, listing_id) if isinstance(listing_id, str) and len(listing_id) <= 64 else None
    )
    if listing is None or not can_see(listing, user):
        # The same answer for "absent" and "not yours": unpublished listings are not probed.
        raise NotFoundError(f"no listing {str(listing_id)[:64]!r}")
    return listing


def get_owned(session: Session, listing_id: str, user: User) -> Listing:
    listing = get_visible(session, listing_id, user)
    if user.role != "admin" and listing.seller_id != user.id:
        raise ForbiddenError("only the listing's seller can do this")
    return listing


def search(
    session: Session,
    *,
    user: User | None,
    target: str | None,
    q: str | None,
    page: int,
    page_size: int,
    mine: bool = False,
    status: str | None = None,
) -> tuple[list[Listing], int]:
    stmt = select(Listing)
    if mine:
        if user is None:
            raise ForbiddenError("sign in to see your own listings")
        stmt = stmt.where(Listing.seller_id == user.id)
    elif status is not None:
        if user is None or user.role != "admin":
            raise ForbiddenError("only admins can filter listings by status")
        # A listing with a version in that state counts too (a listed listing's blocked new version).
        stmt = stmt.where(
            or_(
                Listing.status == status,
                Listing.id.in_(select(ListingVersion.listing_id).where(ListingVersion.status == status)),
            )
        )
    else:
        stmt = stmt.where(Listing.status == "listed", Listing.visibility == "public")
    if target:
        stmt = stmt.where(
            Listing.id.in_(select(Build.listing_id).where(Build.target == target, Build.status == "done"))
        )
    if q:
        like = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        stmt = stmt.where(or_(Listing.name.ilike(like, escape="\\"), Listing.id.ilike(like, escape="\\")))
    total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    pages = max(1, math.ceil(total / page_size))
    rows = session.scalars(
        stmt.order_by(Listing.created_at.desc(), Listing.id).limit(page_size).offset((page - 1) * page_size)
    )
    return list(rows), pages


BUILD_FAILED = "build failed"


def shows_build_details(listing: Listing, user: User | None) -> bool:
    """Whether ``user`` may read why a build of ``listing`` failed: its seller and admins."""
    return user is not None and (user.role == "admin" or user.id == listing.seller_id)


def build_outcome(build: Build, *, details: bool) -> dict[str, Any]:
    """What a viewer sees of a build's progress and outcome. Failure details (errors, retry messages, the
    quality figures and report of a rejected build) are for the seller and admins (``details``); everyone
    else reads only "build failed"."""
    if details or build.status == "done":
        return {
            "message": build.message,
            "error": build.error,
            "quality": build.quality,
            "report": build.quality_html_blob is not None,
        }
    failed = build.status in ("failed", "rejected")
    return {
        "message": BUILD_FAILED if failed else build.message if build.status == "running" else build.status,
        "error": BUILD_FAILED if failed else None,
        "quality": None,
        "report": False,
    }


def build_to_dict(build: Build, *, details: bool) -> dict[str, Any]:
    outcome = build_outcome(build, details=details)
    return {
        "target": build.target,
        "version": build.version.number,
        "status": build.status,
        "progress": round(build.progress, 4),
        "message": outcome["message"],
        "build_hash": build.build_hash,
        "format": build.format,
        "size": build.sealed_size,
        "quality": outcome["quality"],
        "error": outcome["error"],
        "build_url": f"/api/v1/builds/{build.build_hash.split(':', 1)[1]}"
        if build.build_hash and build.status == "done"
        else None,
    }


def visible_versions(listing: Listing, viewer: User | None) -> list[ListingVersion]:
    """The versions ``viewer`` may see: all of them for the seller and admins, the listed ones for others."""
    if shows_build_details(listing, viewer):
        return list(listing.versions)
    return [v for v in listing.versions if v.status == "listed"]


def version_to_dict(version: ListingVersion, viewer: User | None = None) -> dict[str, Any]:
    details = shows_build_details(version.listing, viewer)
    out: dict[str, Any] = {
        "number": version.number,
        "status": version.status,
        "license": version.license,
        "decision": version.decision,
        "model": {"format": version.model_format, "size": version.model_size, "sha256": version.model_sha256},
        "card": version.card,
        "created_at": version.created_at,
        "builds": [build_to_dict(b, details=details) for b in version.builds],
    }
    if details:
        out["targets"] = version.targets
        out["target_options"] = version.target_options or {}
        out["review_note"] = version.review_note
    return out


def listing_to_dict(
    listing: Listing, viewer: User | None = None, *, version_cards: bool = False
) -> dict[str, Any]:
    """The listing with its current version (the newest listed one, else the newest) flattened in, as
    before versions existed, and every version ``viewer`` may see under ``versions`` (with its model card
    when ``version_cards``: one listing's page, not a list of listings, to keep lists small)."""
    current = version_to_dict(listing.current, viewer)
    return {
        "id": listing.id,
        "name": listing.name,
        "seller": listing.seller.name,
        "status": listing.status,
        "eval_days": listing.eval_days,
        "eval_runs": listing.eval_runs,
        "eval_device_limit": listing.eval_device_limit,
        "price_per_seat": listing.price_per_seat,
        "visibility": listing.visibility,
        **{k: v for k, v in current.items() if k not in ("number", "status")},
        "version": listing.current.number,
        "created_at": listing.created_at,
        "versions": [
            {k: v for k, v in version_to_dict(x, viewer).items() if version_cards or k != "card"}
            for x in visible_versions(listing, viewer)
        ],
    }


def unpublish(session: Session, user: User, listing_id: str) -> Listing:
    """The seller (or an admin) takes a listing off the store: no new licenses are issued, it leaves search,
    and the licenses already issued keep running until they expire or run out (their builds stay)."""
    listing = get_owned(session, listing_id, user)
    if listing.status != "listed":
        raise ConflictError(
            f"listing {listing.id} is {listing.status}; only a listed listing can be unpublished"
        )
    listing.status = "unpublished"
    session.commit()
    return listing


def _any_job_running(session: Session, where: Any) -> bool:
    return bool(
        session.scalar(
            select(func.count())
            .select_from(Job)
            .join(Build, Job.build_id == Build.id)
            .where(where, Job.state == "running")
        )
    )


def _delete_builds(session: Session, builds: list[Build]) -> list[str | None]:
    """Delete builds and their jobs (flushed); returns their blob keys, to delete once the rows are gone."""
    blobs: list[str | None] = []
    for build in builds:
        blobs += [build.blob_key, build.quality_html_blob]
        for job in session.scalars(select(Job).where(Job.build_id == build.id)):
            session.delete(job)
        session.delete(build)
    session.flush()
    return blobs


def delete(ctx: StoreContext, session: Session, user: User, listing_id: str) -> None:
    """Delete a listing no license was ever issued for, every version: rows, then blobs (a crash in between
    leaves only orphan blobs, which `edgemart store gc` sweeps). A licensed listing can only be unpublished."""
    listing = get_owned(session, listing_id, user)
    if session.scalar(select(func.count()).select_from(License).where(License.listing_id == listing.id)):
        raise ConflictError(
            f"listing {listing.id} has licenses; unpublish it instead (they keep running until they run out)"
        )
    if _any_job_running(session, Build.listing_id == listing.id):
        raise ConflictError(f"listing {listing.id} is being packaged right now; delete it when the job ends")
    blobs = _delete_builds(session, list(listing.builds))
    for version in listing.versions:
        blobs += [version.model_blob, version.calibration_blob]
        session.delete(version)
    session.flush()
    session.delete(listing)
    session.commit()
    for key in blobs:
        if key:
            ctx.blobs.delete(key)


def get_version(listing: Listing, number: Any, *, listed_only: bool = False) -> ListingVersion:
    """Version ``number`` of ``listing`` (an integer ≥ 1, or its decimal text); NotFoundError naming the
    versions there are. ``listed_only``: only a listed version counts (what buyers may pin)."""
    if isinstance(number, str) and number.isdigit() and len(number) <= 9:
        number = int(number)
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:
        raise UsageError("version must be a positive integer")
    choices = [v for v in listing.versions if v.status == "listed" or not listed_only]
    for version in choices:
        if version.number == number:
            return version
    known = ", ".join(str(v.number) for v in choices) or "none"
    raise NotFoundError(
        f"listing {listing.id} has no {'listed ' if listed_only else ''}version {number} (versions: {known})"
    )


@dataclass
class RepackageForm:
    """A re-packaging request: which version (default the newest), the targets to (re)build, their options
    (replacing those targets' options; other targets keep theirs) and new calibration samples."""

    version: str | int | None = None
    targets: str | list[str] | None = None
    options: str | dict[str, Any] | None = None
    calibration: BinaryIO | None = None


def repackage(
    ctx: StoreContext, session: Session, user: User, listing_id: str, form: RepackageForm
) -> UploadResult:
    """Build one version again for the given targets (new ones are added): its not-yet-licensed builds of
    those targets are replaced. A licensed build is never replaced (its holders' devices run it): publish a
    new version instead. The model is unchanged, so the compliance decision stands."""
    listing = get_owned(session, listing_id, user)
    version = get_version(listing, form.version) if form.version not in (None, "") else listing.latest
    label = f"version {version.number} of {listing.id}"
    if version.status in ("blocked", "rejected"):
        raise ConflictError(f"{label} is {version.status} by the compliance gate; it is never packaged")
    if listing.status == "unpublished":
        raise ConflictError(f"listing {listing.id} is unpublished")
    problems: list[Problem] = []
    targets = _targets(problems, form.targets)
    options = _target_options(problems, form.options, targets)
    _refuse_if(problems, "re-packaging refused")
    if any(b.status in ("queued", "running") for b in version.builds):
        raise ConflictError(f"{label} is being packaged; re-package it when its jobs have ended")
    replaced = [b for b in version.builds if b.target in targets]
    licensed = session.scalars(
        select(Build.target)
        .join(License, License.build_id == Build.id)
        .where(Build.id.in_([b.id for b in replaced]))
    ).all()
    if licensed:
        raise ConflictError(
            f"the {', '.join(sorted(set(licensed)))} build of {label} is licensed and stays as it is;"
            " publish a new version (seller upload --listing) to change it"
        )
    created: list[str] = []
    try:
        calibration_put = _store_calibration(ctx, problems, form.calibration, created)
        _refuse_if(problems, "re-packaging refused")
        stale = _delete_builds(session, replaced)
        session.expire(version, ["builds"])  # the loaded collections still hold the deleted rows
        session.expire(listing, ["builds"])
        if calibration_put is not None:
            stale.append(version.calibration_blob)
            version.calibration_blob = calibration_put.key
        version.targets = list(dict.fromkeys([*version.targets, *targets]))
        version.target_options = {**(version.target_options or {}), **options}
        if version.status == "failed":
            version.status = "pending"
        settle(listing)
        now = ctx.now()
        job_ids = add_build_jobs(
            session, version, targets, now=now, max_attempts=int(ctx.config["JOB_MAX_ATTEMPTS"])
        )
        session.commit()
    except BaseException:
        session.rollback()
        for key in created:
            ctx.blobs.delete(key)
        raise
    for key in stale:
        if key:
            ctx.blobs.delete(key)
    for job_id in job_ids:
        ctx.queue.enqueue(job_id)
    return UploadResult(listing, job_ids, False, version)


def review(
    ctx: StoreContext,
    session: Session,
    admin: User,
    listing_id: str,
    action: str,
    note: str,
    version: Any = None,
) -> list[str]:
    """Admin decision on a blocked upload (the newest blocked or rejected version unless ``version`` names
    one): ``approve`` queues its packaging, ``reject`` upholds the block."""
    if admin.role != "admin":
        raise ForbiddenError("only admins review blocked uploads")
    listing = session.get(Listing, listing_id) if isinstance(listing_id, str) else None
    if listing is None:
        raise NotFoundError(f"no listing {str(listing_id)[:64]!r}")
    if version is not None:
        chosen = get_version(listing, version)
    else:
        held = [v for v in listing.versions if v.status in ("blocked", "rejected")]
        chosen = held[-1] if held else listing.latest
    if chosen.status not in ("blocked", "rejected"):
        raise UsageError(f"listing {listing.id} version {chosen.number} is {chosen.status}, not blocked")
    if action not in ("approve", "reject"):
        raise UsageError("action must be 'approve' or 'reject'")
    chosen.reviewed_by = admin.id
    chosen.review_note = (note or "")[:2000]
    job_ids: list[str] = []
    if action == "approve":
        chosen.status = "pending"
        job_ids = add_build_jobs(
            session,
            chosen,
            [t for t in chosen.targets if t not in {b.target for b in chosen.builds}],
            now=ctx.now(),
            max_attempts=int(ctx.config["JOB_MAX_ATTEMPTS"]),
        )
    else:
        chosen.status = "rejected"
    settle(listing)
    session.commit()
    for job_id in job_ids:
        ctx.queue.enqueue(job_id)
    return job_ids
