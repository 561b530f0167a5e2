# Why this is one module: the HTML blueprint: thin views, one per page and form.
"""The web UI (blueprint ``web``): browse and search, listing pages with quality reports and the compliance
decision, seller upload with live job progress, buyer licenses and devices, builder production seats with
the downloads `edgemart bundle build` needs, seller usage, admin review.

Views stay thin: they parse the form, call store.services and render. Every POST checks the CSRF token."""

from __future__ import annotations

import datetime
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from typing import IO, Any

from flask import (
    Blueprint,
    Response,
    abort,
    flash,
    make_response,
    redirect,
    render_template,
    request,
    send_file,
    url_for,
)
from sqlalchemy import select

from edgemart.core.errors import (
    AuthError,
    ConflictError,
    EdgemartError,
    ForbiddenError,
    NotFoundError,
    TooManyAttempts,
    UsageError,
)
from store import auth
from store.auth import check_csrf, csrf_token, ctx, db
from store.errors import error_payload, set_retry_after
from store.models import Build, Device, License, Listing, User
from store.services import accounts, licensing, listings, packaging, usage

bp = Blueprint("web", __name__)


@bp.app_template_filter("utc")
def utc(ts: int | None) -> str:
    """Unix seconds as a readable UTC time for the pages (the API keeps integers)."""
    if not ts:
        return "–"
    return datetime.datetime.fromtimestamp(int(ts), tz=datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


@bp.app_template_filter("cents")
def cents(amount: int | None) -> str:
    """A price in cents as a decimal amount ("free" for 0)."""
    amount = int(amount or 0)
    return f"{amount // 100:,}.{amount % 100:02d}" if amount else "free"


@bp.app_context_processor
def _inject() -> dict[str, Any]:
    user = None
    try:
        user = (
            auth.current_user(required=False, cookie_ok=True)
            if not request.path.startswith("/api/")
            else None
        )
    except (AuthError, ForbiddenError):
        user = None
    return {"me": user, "csrf_token": csrf_token}


def _web_user(*roles: str) -> User:
    user = auth.current_user(required=False, cookie_ok=True)
    if user is None:
        abort(redirect(url_for("web.login", next=request.path)))
    assert user is not None
    if roles and user.role not in roles:
        raise ForbiddenError(f"this page is for {' or '.join(roles)} accounts")
    return user


@bp.before_request
def _csrf() -> None:
    if request.method == "POST":
        # The CSRF check parses the form, so a view's larger body limit must be set before it.
        limit = _body_limit(request.endpoint)
        if limit is not None:
            request.max_content_length = limit
        check_csrf()


@bp.before_request
def _authenticate() -> None:
    # Before the view writes anything: checking the web session may write its row (touch or delete) and commit.
    try:
        auth.current_user(required=False, cookie_ok=True)
    except (AuthError, ForbiddenError):
        pass  # a bad Authorization header: the views that need a user raise it again


def _body_limit(endpoint: str | None) -> int | None:
    cfg = ctx().config
    if endpoint in ("web.sell", "web.new_version", "web.repackage"):
        return 2 * int(cfg["MAX_UPLOAD_BYTES"]) + (1 << 20)
    if endpoint == "web.buy_seats":
        return int(cfg["MAX_JSON_BYTES"]) + 64 * 1024  # what the API takes as JSON, plus multipart framing
    return None


@bp.get("/")
def index() -> Any:
    import packagers

    user = auth.current_user(required=False, cookie_ok=True)
    page = request.args.get("page", "1")
    page_no = int(page) if page.isdigit() and 0 < int(page) < 100_000 else 1
    target = request.args.get("target", "")[:40] or None
    q = request.args.get("q", "")[:200] or None
    items, pages = listings.search(
        db(), user=user, target=target, q=q, page=page_no, page_size=int(ctx().config["PAGE_SIZE"])
    )
    return render_template(
        "index.html",
        items=items,
        page=page_no,
        pages=pages,
        q=q or "",
        target=target or "",
        targets=packagers.TARGETS,
    )


@bp.get("/listings/<listing_id>")
def listing(listing_id: str) -> Any:
    user = auth.current_user(required=False, cookie_ok=True)
    return _listing_page(listings.get_visible(db(), listing_id, user), user, SeatOrder())


def _listing_page(
    item: Listing,
    user: User | None,
    order: SeatOrder,
    status: int = 200,
    problems: list[dict[str, Any]] | None = None,
) -> Any:
    import packagers

    owner = listings.shows_build_details(item, user)
    # The page follows every job still open, whoever started it (an upload, an admin's approval, a retry).
    jobs: list[str] = []
    if owner:
        asked = set(request.args.get("jobs", "").split(","))  # the upload's jobs, even if already ended
        jobs = [j for j in listings.job_ids_of(db(), item) if j in asked]
        jobs += [j for j in listings.job_ids_of(db(), item, open_only=True) if j not in jobs]
    outcomes = {b.id: listings.build_outcome(b, details=owner) for b in item.builds}
    return render_template(
        "listing.html",
        l=item,
        owner=owner,
        jobs=jobs,
        order=order,
        outcomes=outcomes,
        versions=listings.visible_versions(item, user),
        targets=packagers.TARGETS,
        problems=problems or [],
    ), status


@bp.post("/listings/<listing_id>/versions")
def new_version(listing_id: str) -> Any:
    """The seller publishes a new version from the listing page (the same service as the API)."""
    user = _web_user("seller", "admin")
    item = listings.get_owned(db(), listing_id, user)
    auth.rate_limit("upload", user)
    form, files = request.form, request.files
    card = files.get("card")
    upload = listings.UploadForm(
        license=form.get("license") or None,
        card=card.stream if card is not None and card.filename else None,
        targets=form.getlist("targets"),
        options=form.get("options") or None,
        model=_file_part("model"),
        calibration=_file_part("calibration"),
        listing=item.id,
    )
    try:
        result = listings.create_listing(ctx(), db(), user, upload)
    except listings.UploadProblems as exc:
        return _listing_page(listings.get_owned(db(), listing_id, user), user, SeatOrder(), 422, exc.details)
    if result.blocked:
        flash(
            f"The compliance gate blocked version {result.version.number}; it is kept for review by an admin."
        )
    else:
        flash(
            f"Version {result.version.number} published: packaging for {', '.join(result.version.targets)}."
        )
    return redirect(url_for("web.listing", listing_id=item.id, jobs=",".join(result.job_ids)))


@bp.post("/listings/<listing_id>/repackage")
def repackage(listing_id: str) -> Any:
    """The seller re-packages a version from the listing page."""
    user = _web_user("seller", "admin")
    item = listings.get_owned(db(), listing_id, user)
    auth.rate_limit("upload", user)
    form = listings.RepackageForm(
        version=request.form.get("version") or None,
        targets=request.form.getlist("targets"),
        options=request.form.get("options") or None,
        calibration=_file_part("calibration"),
    )
    try:
        result = listings.repackage(ctx(), db(), user, item.id, form)
    except listings.UploadProblems as exc:
        return _listing_page(listings.get_owned(db(), listing_id, user), user, SeatOrder(), 422, exc.details)
    flash(f"Version {result.version.number}: packaging again for {len(result.job_ids)} target(s).")
    return redirect(url_for("web.listing", listing_id=item.id, jobs=",".join(result.job_ids)))


def _file_part(name: str) -> Any:
    """The stream of an uploaded file field, None when no file was chosen."""
    part = request.files.get(name)
    return part.stream if part is not None and part.filename else None


# ------------------------------------------------------------------------------------------ production seats

_PEM_BLOCK = re.compile(r"-----BEGIN [A-Z0-9 ]{1,40}-----.+?-----END [A-Z0-9 ]{1,40}-----", re.S)
_SEATS = re.compile(r"[0-9]{1,9}")


@dataclass
class SeatOrder:
    """The "Buy production seats" form as typed: carried from the form to its review and confirmation."""

    target: str = ""
    mode: str = "fleet"  # "fleet" (fleet key + seats) or "devices" (one license per certificate)
    device_certs: str = ""
    fleet_key: str = ""
    seats: str = "1"
    error: str | None = None
    reviewed: bool = False

    @classmethod
    def from_form(cls) -> SeatOrder:
        form = request.form
        return cls(
            target=form.get("target", "")[:40],
            mode="devices" if form.get("mode") == "devices" else "fleet",
            device_certs=_pem_field("device_certs"),
            fleet_key=_pem_field("fleet_key"),
            seats=form.get("seats", "").strip()[:20],
        )

    def certs(self) -> list[str]:
        """One item per PEM block; text without any block is passed on whole for the service to refuse."""
        blocks = _PEM_BLOCK.findall(self.device_certs)
        return blocks or ([self.device_certs] if self.device_certs.strip() else [])

    def seat_count(self) -> int | None:
        if self.mode == "devices":
            return len(self.certs()) or None
        seats = int(self.seats) if _SEATS.fullmatch(self.seats) else 0
        return seats if 1 <= seats <= licensing.MAX_FLEET_SEATS else None

    def body(self) -> dict[str, Any]:
        """The request body of POST /api/v1/listings/<id>/production-licenses."""
        if self.mode == "devices":
            return {"target": self.target, "device_certs": self.certs()}
        seats: Any = int(self.seats) if _SEATS.fullmatch(self.seats) else self.seats
        return {"target": self.target, "fleet_key": self.fleet_key, "seats": seats}


def _pem_field(name: str) -> str:
    """A PEM form field: the uploaded ``<name>_file`` when one was chosen, else the pasted text."""
    upload = request.files.get(f"{name}_file")
    if upload is not None and upload.filename:
        return upload.stream.read().decode("ascii", "replace")
    return request.form.get(name, "")


@bp.post("/listings/<listing_id>/production-seats")
def buy_seats(listing_id: str) -> Any:
    """Review (price shown) then confirm a production-seat order; the licensing service issues it."""
    user = _web_user(*licensing.PRODUCTION_BUYERS)
    item = listings.get_visible(db(), listing_id, user)
    order = SeatOrder.from_form()
    step = request.form.get("step", "review")
    if step == "edit":
        return _listing_page(item, user, order)
    if step != "confirm":
        if order.seat_count() is None:
            order.error = (
                "paste or upload at least one device certificate (PEM)"
                if order.mode == "devices"
                else f"seats must be a whole number between 1 and {licensing.MAX_FLEET_SEATS}"
            )
            return _listing_page(item, user, order, 400)
        try:  # the whole order is checked before a price is shown
            licensing.check_production_order(ctx(), db(), user, item.id, order.body())
        except EdgemartError as exc:
            order.error = error_payload(exc)["error"]["message"]
            return _listing_page(item, user, order, exc.http_status)
        order.reviewed = True
        return _listing_page(item, user, order)
    auth.rate_limit("license", user)
    try:
        rows = licensing.production_licenses(ctx(), db(), user, item.id, order.body())
    except EdgemartError as exc:
        db().rollback()  # nothing half-issued may be flushed while the page re-renders
        order.error = error_payload(exc)["error"]["message"]
        return _listing_page(item, user, order, exc.http_status)
    flash(
        f"{len(rows)} production license(s) for {item.id} ({order.target}), "
        f"{sum(r.seats for r in rows)} seat(s): download them below."
    )
    return redirect(url_for("web.my_licenses", _anchor="production"))


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    if request.method == "POST":
        try:
            auth.rate_limit("login")
            user = accounts.authenticate_password(
                db(), request.form.get("name", ""), request.form.get("password", ""), now=ctx().now()
            )
        except (AuthError, TooManyAttempts) as exc:
            resp = make_response(render_template("login.html", error=exc.message), exc.http_status)
            set_retry_after(exc, resp)
            return resp
        auth.login(user)
        target = request.args.get("next", "")
        return redirect(
            target if target.startswith("/") and not target.startswith("//") else url_for("web.index")
        )
    return render_template("login.html", error=None)


@bp.post("/logout")
def logout() -> Any:
    auth.logout()
    return redirect(url_for("web.index"))


@bp.route("/sell", methods=["GET", "POST"])
def sell() -> Any:
    import packagers

    user = _web_user("seller", "admin")
    if request.method == "GET":
        return render_template(
            "sell.html", problems=[], form={}, targets=packagers.TARGETS, chosen=["arm-cpu"]
        )
    auth.rate_limit("upload", user)
    form, files = request.form, request.files
    card = files.get("card")
    upload = listings.UploadForm(
        name=form.get("name"),
        license=form.get("license"),
        card=card.stream if card is not None and card.filename else (form.get("card_text") or None),
        targets=form.getlist("targets"),
        visibility=form.get("visibility"),
        eval_days=form.get("eval_days"),
        eval_runs=form.get("eval_runs"),
        price_per_seat=form.get("price_per_seat"),
        options=form.get("options"),
        model=_file_part("model"),
        calibration=_file_part("calibration"),
    )
    try:
        result = listings.create_listing(ctx(), db(), user, upload)
    except listings.UploadProblems as exc:
        return render_template(
            "sell.html",
            problems=exc.details,
            form=form,
            targets=packagers.TARGETS,
            chosen=form.getlist("targets"),
        ), 422
    if result.blocked:
        flash("The compliance gate blocked this upload; it is kept for review by an admin.")
    return redirect(url_for("web.listing", listing_id=result.listing.id, jobs=",".join(result.job_ids)))


@bp.get("/me/licenses")
def my_licenses() -> Any:
    user = _web_user()
    devices = (
        db().scalars(select(Device).where(Device.owner_id == user.id).order_by(Device.enrolled_at)).all()
    )
    rows = licensing.visible_licenses(db(), user) if user.role != "seller" else []
    held = [r for r in rows if r.kind == "production" and r.buyer_id == user.id]
    evals = [r for r in rows if r not in held]
    return render_template(
        "licenses.html",
        licenses=evals,
        runs_left=usage.runs_left(db(), evals),
        production=[licensing.license_to_dict(r, with_token=False) for r in held],
        devices=devices,
    )


def _held_license(user: User, license_id: str) -> License:
    """A license whose token ``user`` may download: like the API, only its holder (others get 404)."""
    lic = licensing.get_license(db(), user, license_id)
    if lic.buyer_id != user.id:
        raise NotFoundError(f"no license {license_id[:64]!r}")
    return lic


@bp.get("/me/licenses/<license_id>.lic")
def license_token(license_id: str) -> Any:
    lic = _held_license(_web_user(), license_id)
    resp = Response(lic.token, mimetype="application/octet-stream")
    resp.headers["Content-Disposition"] = f"attachment; filename={lic.license_id}.lic"
    return resp


BUNDLE_README = """Inputs for `edgemart bundle build`, as downloaded from the store:
  licenses/  production license tokens (*.lic)
  builds/    the sealed builds they unlock (*.emdl)
  cards/     the listings' model cards (<listing>.md): license and lineage for the ML-BOM and NOTICE
  root.crt   the store root certificate, to check every license before signing

  edgemart bundle build --licenses licenses --builds builds --cards cards --root root.crt \\
      --signing-key builder.pem --out fleet.tar.gz

(make a builder key once with `edgemart bundle keygen --out builder.pem`)
"""


@bp.get("/me/licenses/bundle-inputs.zip")
def bundle_inputs() -> Any:
    """The chosen production licenses with their builds, cards and the store root, as one ZIP."""
    user = _web_user()
    ids = list(dict.fromkeys(request.args.getlist("license")))
    if not ids or len(ids) > 1000:
        raise UsageError("choose between 1 and 1000 licenses to download")
    held = [_held_license(user, license_id) for license_id in ids]
    for lic in held:
        if lic.revoked_at is not None:
            raise ConflictError(f"license {lic.license_id} is revoked; leave it out of the bundle")
    builds: dict[str | None, Build] = {}
    for lic in held:
        # The build download is authorized as in the API: an unrevoked license for it, held by you.
        build = licensing.build_for_download(db(), user, (lic.build.build_hash or "").split(":", 1)[-1])
        builds[build.build_hash] = build
    return send_file(
        _zip_bundle_inputs(held, list(builds.values())),
        mimetype="application/zip",
        download_name="bundle-inputs.zip",
        as_attachment=True,
        max_age=0,
    )


def _zip_bundle_inputs(held: list[License], builds: list[Build]) -> IO[bytes]:
    out = tempfile.TemporaryFile()
    stored = zipfile.ZIP_STORED  # sealed builds do not compress
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("README.txt", BUNDLE_README)
        zf.writestr("root.crt", ctx().root_cert_pem())
        zf.mkdir("cards")
        for lic in sorted(held, key=lambda x: x.license_id):
            zf.writestr(f"licenses/{lic.license_id}.lic", lic.token)
        for build in sorted(builds, key=lambda b: b.build_hash or ""):
            assert build.build_hash is not None and build.blob_key is not None
            info = zipfile.ZipInfo(f"builds/{build.build_hash.split(':', 1)[-1]}.emdl")
            info.compress_type = stored
            info.external_attr = 0o644 << 16
            with ctx().blobs.open(build.blob_key) as src, zf.open(info, "w", force_zip64=True) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        # One card per listing: that of the newest version among the licenses chosen.
        cards = {lic.listing_id: lic.build.version for lic in sorted(held, key=lambda x: x.version)}
        for listing_id, version in sorted(cards.items()):
            if version.card:
                zf.writestr(f"cards/{listing_id}.md", version.card)
    out.seek(0)
    return out


@bp.get("/me/usage")
def my_usage() -> Any:
    user = _web_user("seller", "admin")
    return render_template("usage.html", overview=usage.seller_overview(db(), user))


@bp.get("/admin/review")
def admin_review() -> Any:
    user = _web_user("admin")
    items, _ = listings.search(db(), user=user, target=None, q=None, page=1, page_size=200, status="blocked")
    return render_template("review.html", items=items)


@bp.post("/admin/review/<listing_id>")
def admin_decide(listing_id: str) -> Any:
    user = _web_user("admin")
    listings.review(
        ctx(),
        db(),
        user,
        listing_id,
        request.form.get("action", ""),
        request.form.get("note", ""),
        request.form.get("version") or None,
    )
    flash(f"{listing_id}: {request.form.get('action')}d")
    return redirect(url_for("web.admin_review"))


@bp.get("/admin/jobs")
def admin_jobs() -> Any:
    """The dead-letter view: jobs that used up their attempts (and final failures), with a retry button."""
    user = _web_user("admin")
    state = request.args.get("state", "dead")
    items, _ = packaging.search_jobs(db(), user, state=state, page=1, page_size=200)
    return render_template("jobs.html", items=items, state=state, states=packaging.JOB_STATES)


@bp.post("/admin/jobs/<job_id>/retry")
def admin_retry_job(job_id: str) -> Any:
    _web_user("admin")
    job = packaging.requeue_dead(ctx(), job_id)
    flash(f"job {job.id} queued again")
    return redirect(url_for("web.admin_jobs"))


@bp.get("/me/tokens")
def my_tokens() -> Any:
    user = _web_user()
    return render_template("tokens.html", tokens=accounts.list_tokens(db(), user), new_token=None)


@bp.post("/me/tokens")
def create_token() -> Any:
    user = _web_user()
    token = accounts.issue_token(db(), user, now=ctx().now())
    db().commit()
    # Shown once, on this page only: it is stored as a hash.
    return render_template("tokens.html", tokens=accounts.list_tokens(db(), user), new_token=token)


@bp.post("/me/tokens/<token_id>/revoke")
def revoke_token(token_id: str) -> Any:
    user = _web_user()
    row = accounts.revoke_token(db(), user, token_id, now=ctx().now())
    db().commit()
    flash(f"token {row.prefix}… revoked")
    return redirect(url_for("web.my_tokens"))
