"""Listings: upload validation (every problem at once), the compliance gate, job creation, search, views.

An upload either becomes a listing with its jobs or leaves nothing behind (no blob, no row)."""

from __future__ import annotations

import math
import re
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlalchemy.orm import Session

from drm.errors import (
    ConflictError,
    EdgemartError,
    ForbiddenError,
    NotFoundError,
    Refusal,
    UsageError,
    with_prefix,
)
from edge_runtime.fileio import fault_point
from store.blobs import TooLarge, new_blob_id
from store.context import StoreContext
from store.models import Build, Job, Listing, User

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
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class UploadResult:
    listing: Listing
    job_ids: list[str]
    blocked: bool


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


def load_samples(data: bytes, config: Mapping[str, Any]) -> dict[str, Any]:
    """Parse an uploaded samples .npz with the packagers' loader (it reads paths, so via a private temp dir).

    The archive's sizes, compression ratio and array headers are checked against the configured caps
    (MAX_SAMPLE_BYTES, MAX_SAMPLE_MEMBERS, MAX_SAMPLE_RATIO) before anything is inflated."""
    import packagers

    limits = packagers.SampleLimits(
        max_bytes=int(config["MAX_SAMPLE_BYTES"]),
        max_members=int(config["MAX_SAMPLE_MEMBERS"]),
        max_ratio=float(config["MAX_SAMPLE_RATIO"]),
    )
    with tempfile.TemporaryDirectory(prefix="edgemart-samples-") as tmp:
        path = Path(tmp) / "samples.npz"
        path.write_bytes(data)
        try:
            return packagers.load_calibration(path, limits)
        except UsageError as exc:
            # The temp path means nothing to the uploader.
            raise UsageError(exc.message.replace(f"sample file {path}", "the calibration file")) from None


def _with_card_declarations(
    front_matter: dict[str, Any], targets: list[str], target_options: dict[str, Any]
) -> dict[str, Any]:
    """The card's `fixed` and `state` declarations as every target's options, unless the seller gave them."""
    import packagers

    declared = packagers.card_contract_options(front_matter)
    if not declared:
        return target_options
    return {t: {**declared, **target_options.get(t, {})} for t in targets if t in packagers.TARGETS}


def _sample_problems(
    info: Any, samples: dict[str, Any], targets: list[str], target_options: dict[str, Any]
) -> list[Problem]:
    """The samples against the model's inputs by each chosen target's sample contract (its fixed inputs and
    state pairs); the same message for several targets is listed once."""
    import packagers

    messages: dict[str, list[str]] = {}
    for target in [t for t in targets if t in packagers.TARGETS]:
        try:
            packagers.get_packager(target, target_options.get(target)).bind(info, samples, "calibration")
        except UsageError as exc:
            messages.setdefault(exc.message, []).append(target)
    return [
        Problem("calibration", "samples_do_not_fit", message)
        if len(names) == len(targets)
        else Problem("calibration", "samples_do_not_fit", f"{', '.join(names)}: {message}")
        for message, names in messages.items()
    ]


# ------------------------------------------------------------------------------------------ upload


def create_listing(ctx: StoreContext, session: Session, seller: User, form: UploadForm) -> UploadResult:
    """Validate, run the compliance gate, then store the listing and one job per target.

    Raises UploadProblems (422, all problems) or Blocked (403, after keeping the listing for appeal).
    On any failure the blobs this call created are deleted and the transaction is rolled back."""
    import packagers

    if seller.role not in ("seller", "admin"):
        raise ForbiddenError("only sellers can upload models")
    cfg = ctx.config
    problems: list[Problem] = []
    created: list[str] = []
    try:
        name = _clean_line(problems, "name", form.name)
        slug = slugify(name or "")
        if name is None:
            name = ""
        elif not name:
            problems.append(Problem("name", "missing", "name is required"))
        elif len(name) > MAX_NAME:
            problems.append(Problem("name", "too_long", f"name must be at most {MAX_NAME} characters"))
        elif not slug:
            problems.append(Problem("name", "no_slug", "name must contain letters or digits"))
        elif session.get(Listing, slug) is not None:
            # A retry whose key lookup (in the view) ran before the first attempt committed meets the
            # first attempt's listing here: it is that upload, not a name clash.
            if form.idempotency_key is not None:
                existing = by_idempotency_key(session, seller, form.idempotency_key)
                if existing is not None:
                    raise DuplicateUpload(existing)
            problems.append(
                Problem("name", "name_taken", f"a listing {slug!r} already exists; choose another name")
            )

        license_expr = _clean_line(problems, "license", form.license)
        if license_expr is None:
            license_expr = ""
        elif not license_expr:
            problems.append(Problem("license", "missing", "license (an SPDX expression) is required"))
        elif len(license_expr) > 256:
            problems.append(
                Problem("license", "too_long", "license expression must be at most 256 characters")
            )
        elif (msg := _check_license_syntax(license_expr)) is not None:
            problems.append(Problem("license", "invalid_license", msg))

        targets = _targets(problems, form.targets)
        target_options = _target_options(problems, form.options, targets)
        visibility = (form.visibility or "public").strip()
        if visibility not in VISIBILITIES:
            problems.append(
                Problem("visibility", "invalid", f"visibility must be one of {', '.join(VISIBILITIES)}")
            )
        eval_days = _int_field(problems, "eval_days", form.eval_days, 14, 1, 365)
        eval_runs = _int_field(problems, "eval_runs", form.eval_runs, 1000, 1, 10_000_000)
        price = _int_field(problems, "price_per_seat", form.price_per_seat, 0, 0, 10**9)

        card = _read_text(problems, "card", form.card, cfg["MAX_CARD_BYTES"])
        if card is not None:
            from licenses.card import parse_model_card

            try:
                declared = parse_model_card(card).raw
                target_options = _with_card_declarations(declared, targets, target_options)
            except UsageError as exc:
                problems.append(Problem("card", "invalid_card", with_prefix("model card", exc.message)))

        model_bytes: bytes | None = None
        model_put = None
        model_info = None
        if form.model is None:
            problems.append(Problem("model", "missing", "model file is required"))
        else:
            try:
                # Each upload gets its own blob (not a content-addressed one another upload may share), so
                # deleting it when this upload fails can never take a blob from under a concurrent one.
                model_put = ctx.blobs.put_stream(
                    form.model, max_bytes=cfg["MAX_UPLOAD_BYTES"], key=new_blob_id()
                )
            except TooLarge as exc:
                problems.append(Problem("model", "too_large", exc.message))
            else:
                if model_put.created:
                    created.append(model_put.key)
                model_bytes = ctx.blobs.get(model_put.key)
                try:
                    model_info = packagers.inspect_model(model_bytes)
                except UsageError as exc:
                    problems.append(Problem("model", "invalid_model", with_prefix("model", exc.message)))

        calibration_put = None
        uploaded_samples = None
        if form.calibration is not None:
            try:
                calibration_put = ctx.blobs.put_stream(
                    form.calibration, max_bytes=cfg["MAX_UPLOAD_BYTES"], key=new_blob_id()
                )
            except TooLarge as exc:
                problems.append(Problem("calibration", "too_large", exc.message))
            else:
                if calibration_put.created:
                    created.append(calibration_put.key)
                try:
                    uploaded_samples = load_samples(ctx.blobs.get(calibration_put.key), cfg)
                except UsageError as exc:
                    problems.append(
                        Problem("calibration", "invalid_calibration", with_prefix("calibration", exc.message))
                    )

        if uploaded_samples is not None and model_info is not None:
            problems.extend(_sample_problems(model_info, uploaded_samples, targets, target_options))
        if problems:
            raise UploadProblems(
                "upload refused: " + "; ".join(p.message for p in problems),
                details=[p.to_dict() for p in problems],
            )
        assert model_bytes is not None and model_put is not None and model_info is not None

        import licenses

        decision = licenses.check_model(
            model_bytes, card=card, declared_license=license_expr, index=ctx.license_index()
        ).to_dict()
        blocked = decision.get("outcome") == "block"
        now = ctx.now()
        listing = Listing(
            id=slug,
            name=name,
            seller_id=seller.id,
            license=license_expr,
            card=card,
            decision=decision,
            status="blocked" if blocked else "pending",
            visibility=visibility,
            targets=targets,
            target_options=target_options,
            eval_days=eval_days,
            eval_runs=eval_runs,
            eval_device_limit=int(cfg["EVAL_DEVICE_LIMIT"]),
            price_per_seat=price,
            model_blob=model_put.key,
            model_sha256="sha256:" + model_put.sha256,
            model_format=model_info.format,
            model_size=model_put.size,
            calibration_blob=calibration_put.key if calibration_put else None,
            created_at=now,
            idempotency_key=form.idempotency_key,
        )
        session.add(listing)
        fault_point("store", "upload", "before_commit")  # tests/faults: a crash between blob and row
        try:
            job_ids = (
                []
                if blocked
                else add_build_jobs(
                    session, listing, targets, now=now, max_attempts=int(ctx.config["JOB_MAX_ATTEMPTS"])
                )
            )
            session.commit()
        except DBIntegrityError:
            # A concurrent upload took the name, or a concurrent retry of this upload (same key) won.
            session.rollback()
            raise _lost_race(session, seller, slug, form.idempotency_key) from None
    except BaseException:
        session.rollback()
        for key in created:
            ctx.blobs.delete(key)
        raise
    for job_id in job_ids:
        ctx.queue.enqueue(job_id)
    return UploadResult(listing, job_ids, blocked)


class DuplicateUpload(EdgemartError):
    """A retry of an upload that already succeeded (same Idempotency-Key): answer with that listing."""

    def __init__(self, listing: Listing) -> None:
        super().__init__(f"upload already received as listing {listing.id}")
        self.listing = listing


def _lost_race(session: Session, seller: User, slug: str, key: str | None) -> EdgemartError:
    if key is not None:
        existing = by_idempotency_key(session, seller, key)
        if existing is not None:
            return DuplicateUpload(existing)
    return ConflictError(f"a listing {slug!r} was just created by another upload; choose another name")


def by_idempotency_key(session: Session, seller: User, key: str) -> Listing | None:
    return session.scalar(
        select(Listing).where(Listing.seller_id == seller.id, Listing.idempotency_key == key)
    )


def job_ids_of(session: Session, listing: Listing, *, open_only: bool = False) -> list[str]:
    """The listing's job ids, oldest first; ``open_only``: those queued or running (what its page follows)."""
    stmt = select(Job.id).join(Build, Job.build_id == Build.id).where(Build.listing_id == listing.id)
    if open_only:
        stmt = stmt.where(Job.state.in_(("queued", "running")))
    return list(session.scalars(stmt.order_by(Job.created_at, Job.id)))


def add_build_jobs(
    session: Session, listing: Listing, targets: list[str], *, now: int, max_attempts: int = 3
) -> list[str]:
    job_ids = []
    for target in targets:
        build = Build(
            listing=listing,
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
        stmt = stmt.where(Listing.status == status)
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


def listing_to_dict(listing: Listing, viewer: User | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": listing.id,
        "name": listing.name,
        "seller": listing.seller.name,
        "license": listing.license,
        "status": listing.status,
        "decision": listing.decision,
        "eval_days": listing.eval_days,
        "eval_runs": listing.eval_runs,
        "eval_device_limit": listing.eval_device_limit,
        "price_per_seat": listing.price_per_seat,
        "visibility": listing.visibility,
        "model": {"format": listing.model_format, "size": listing.model_size, "sha256": listing.model_sha256},
        "card": listing.card,
        "created_at": listing.created_at,
        "builds": [build_to_dict(b, details=shows_build_details(listing, viewer)) for b in listing.builds],
    }
    if shows_build_details(listing, viewer):
        out["targets"] = listing.targets
        out["target_options"] = listing.target_options or {}
        out["review_note"] = listing.review_note
    return out


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


def delete(ctx: StoreContext, session: Session, user: User, listing_id: str) -> None:
    """Delete a listing no license was ever issued for: its rows, then its blobs (a crash in between leaves
    only orphan blobs, which `edgemart store gc` sweeps). A licensed listing can only be unpublished."""
    from store.models import License

    listing = get_owned(session, listing_id, user)
    if session.scalar(select(func.count()).select_from(License).where(License.listing_id == listing.id)):
        raise ConflictError(
            f"listing {listing.id} has licenses; unpublish it instead (they keep running until they run out)"
        )
    if session.scalar(
        select(func.count())
        .select_from(Job)
        .join(Build, Job.build_id == Build.id)
        .where(Build.listing_id == listing.id, Job.state == "running")
    ):
        raise ConflictError(f"listing {listing.id} is being packaged right now; delete it when the job ends")
    blobs = [listing.model_blob, listing.calibration_blob]
    for build in listing.builds:
        blobs += [build.blob_key, build.quality_html_blob]
        for job in session.scalars(select(Job).where(Job.build_id == build.id)):
            session.delete(job)
        session.delete(build)
    session.flush()
    session.delete(listing)
    session.commit()
    for key in blobs:
        if key:
            ctx.blobs.delete(key)


def review(
    ctx: StoreContext, session: Session, admin: User, listing_id: str, action: str, note: str
) -> list[str]:
    """Admin decision on a blocked upload: ``approve`` queues its packaging, ``reject`` upholds the block."""
    if admin.role != "admin":
        raise ForbiddenError("only admins review blocked uploads")
    listing = session.get(Listing, listing_id) if isinstance(listing_id, str) else None
    if listing is None:
        raise NotFoundError(f"no listing {str(listing_id)[:64]!r}")
    if listing.status not in ("blocked", "rejected"):
        raise UsageError(f"listing {listing.id} is {listing.status}, not blocked")
    if action not in ("approve", "reject"):
        raise UsageError("action must be 'approve' or 'reject'")
    listing.reviewed_by = admin.id
    listing.review_note = (note or "")[:2000]
    job_ids: list[str] = []
    if action == "approve":
        listing.status = "pending"
        job_ids = add_build_jobs(
            session,
            listing,
            [t for t in listing.targets if t not in {b.target for b in listing.builds}],
            now=ctx.now(),
            max_attempts=int(ctx.config["JOB_MAX_ATTEMPTS"]),
        )
    else:
        listing.status = "rejected"
    session.commit()
    for job_id in job_ids:
        ctx.queue.enqueue(job_id)
    return job_ids
