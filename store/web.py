"""The web UI (blueprint ``web``): browse and search, listing pages with quality reports and the compliance
decision, seller upload with live job progress, buyer licenses and devices, seller usage, admin review.

Views stay thin: they parse the form, call store.services and render. Every POST checks the CSRF token."""

from __future__ import annotations

import datetime
from typing import Any

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from sqlalchemy import select

from drm.errors import AuthError, ForbiddenError
from store import auth
from store.auth import check_csrf, csrf_token, ctx, db
from store.models import Device, User
from store.services import accounts, licensing, listings, usage

bp = Blueprint("web", __name__)


@bp.app_template_filter("utc")
def utc(ts: int | None) -> str:
    """Unix seconds as a readable UTC time for the pages (the API keeps integers)."""
    if not ts:
        return "–"
    return datetime.datetime.fromtimestamp(int(ts), tz=datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


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
        check_csrf()


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
    item = listings.get_visible(db(), listing_id, user)
    owner = user is not None and (user.role == "admin" or user.id == item.seller_id)
    jobs = [j for j in request.args.get("jobs", "").split(",") if j][:10] if owner else []
    return render_template("listing.html", l=item, owner=owner, jobs=jobs)


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    if request.method == "POST":
        try:
            user = accounts.authenticate_password(
                db(), request.form.get("name", ""), request.form.get("password", "")
            )
        except AuthError as exc:
            return render_template("login.html", error=exc.message), 401
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
    request.max_content_length = 2 * int(ctx().config["MAX_UPLOAD_BYTES"]) + (1 << 20)
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
        model=files["model"].stream if files.get("model") and files["model"].filename else None,
        calibration=files["calibration"].stream
        if files.get("calibration") and files["calibration"].filename
        else None,
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
    return render_template("licenses.html", licenses=rows, devices=devices)


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
        ctx(), db(), user, listing_id, request.form.get("action", ""), request.form.get("note", "")
    )
    flash(f"{listing_id}: {request.form.get('action')}d")
    return redirect(url_for("web.admin_review"))
