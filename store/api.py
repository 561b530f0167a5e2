# Why this is one module: the JSON API blueprint: thin views, one per endpoint, with their OpenAPI docstrings (the spec is generated from them).
"""The JSON API (/api/v1): thin views over store.services. Each view's docstring ends with its OpenAPI
operation in YAML after a ``---`` line; store.openapi assembles /openapi.json from the registered routes."""

from __future__ import annotations

import json
import re
from typing import Any

from flask import Blueprint, Response, jsonify, request, send_file
from sqlalchemy.exc import IntegrityError as DBIntegrityError

from edgemart.core.errors import EdgemartError, ForbiddenError, NotFoundError, UsageError
from store.auth import ctx, current_user, db, rate_limit, require_user, roles
from store.errors import error_payload
from store.models import IdempotentResponse, Listing, ListingVersion
from store.services import accounts, licensing, listings, metering, packaging, usage

bp = Blueprint("api", __name__, url_prefix="/api/v1")
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,128}$")


def json_body() -> dict[str, Any]:
    """The request's JSON object, bounded in size (413 past MAX_JSON_BYTES)."""
    request.max_content_length = int(ctx().config["MAX_JSON_BYTES"])
    raw = request.get_data(cache=True)
    if not raw:
        raise UsageError("request body must be a JSON object")
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"request body is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(obj, dict):
        raise UsageError("request body must be a JSON object")
    return obj


def _page() -> int:
    raw = request.args.get("page", "1")
    if not raw.isdigit() or not 1 <= int(raw) <= 100_000:
        raise UsageError("page must be a positive integer")
    return int(raw)


def _idempotent(view: Any) -> Response:
    """Replay the first response for a repeated ``Idempotency-Key`` (per user), so upload retries are safe."""
    user = require_user()
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return view()  # type: ignore[no-any-return]
    if not _IDEMPOTENCY_KEY.match(key):
        raise UsageError("Idempotency-Key must be 1-128 printable ASCII characters")
    held = db().get(IdempotentResponse, (user.id, key))
    if held is not None:
        resp = Response(held.body, status=held.status, mimetype="application/json")
        resp.headers["Idempotent-Replayed"] = "true"
        return resp
    try:
        resp = view()
    except EdgemartError as exc:
        resp = jsonify(error_payload(exc))
        resp.status_code = exc.http_status
    if resp.status_code < 500:
        db().rollback()
        db().add(
            IdempotentResponse(
                user_id=user.id,
                key=key,
                status=resp.status_code,
                body=resp.get_data(as_text=True),
                created_at=ctx().now(),
            )
        )
        try:
            db().commit()
        except DBIntegrityError:
            db().rollback()  # a concurrent retry with the same key recorded its (equivalent) answer first
    return resp  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------------ me


@bp.get("/me")
def me() -> Any:
    """Who the token belongs to.
    ---
    summary: The authenticated user
    responses: {200: {description: "{id, name, role}", schema: Me}, 401: {description: unauthenticated}}
    """
    user = require_user()
    return {"id": user.id, "name": user.name, "role": user.role}


@bp.get("/tokens")
def list_tokens() -> Any:
    """Your API tokens (prefix and dates; the token text is shown only when created).
    ---
    summary: Your API tokens
    responses: {200: {description: "{items: [token]}", schema: TokenList}, 401: {description: unauthenticated}}
    """
    return {"items": [accounts.token_to_dict(t) for t in accounts.list_tokens(db(), require_user())]}


@bp.post("/tokens")
def create_token() -> Any:
    """A new API token with your account's role (shown once; store only its hash server-side).
    ---
    summary: Create an API token
    responses: {201: {description: "{token, id, prefix, role}", schema: NewToken}, 401: {description: unauthenticated}}
    """
    user = require_user()
    token = accounts.issue_token(db(), user, now=ctx().now())
    db().commit()
    row = accounts.list_tokens(db(), user)[-1]
    return {"token": token, **accounts.token_to_dict(row)}, 201


@bp.post("/tokens/<token_id>/revoke")
def revoke_token(token_id: str) -> Any:
    """Revoke one of your tokens at once (admins: anyone's — the response to a stolen token).
    ---
    summary: Revoke an API token
    parameters: [{name: token_id, in: path, required: true, schema: {type: integer}}]
    responses: {200: {description: the token, schema: Token}, 404: {description: "not yours / no such token"}}
    """
    row = accounts.revoke_token(db(), require_user(), token_id, now=ctx().now())
    db().commit()
    return accounts.token_to_dict(row)


# ------------------------------------------------------------------------------------------ listings


@bp.get("/listings")
def list_listings() -> Any:
    """Browse and search listings.
    ---
    summary: Listings (public and listed; mine=1 for your own, status=S for admins)
    parameters:
      - {name: target, in: query, schema: {type: string}}
      - {name: q, in: query, schema: {type: string}}
      - {name: page, in: query, schema: {type: integer, minimum: 1}}
      - {name: mine, in: query, schema: {type: string, enum: ["1"]}}
      - {name: status, in: query, schema: {type: string}}
    responses: {200: {description: "{items: [listing], page, pages}", schema: ListingPage}, 403: {description: "mine=1 or status=S without the right account"}}
    """
    user = current_user(required=False)
    page = _page()
    q = request.args.get("q", "")[:200] or None
    target = request.args.get("target", "")[:40] or None
    items, pages = listings.search(
        db(),
        user=user,
        target=target,
        q=q,
        page=page,
        page_size=int(ctx().config["PAGE_SIZE"]),
        mine=request.args.get("mine") == "1",
        status=request.args.get("status") or None,
    )
    return {"items": [listings.listing_to_dict(x, user) for x in items], "page": page, "pages": pages}


@bp.post("/listings")
def upload_listing() -> Any:
    """Upload a model (multipart): it is checked, gated for compliance and packaged per target.
    ---
    summary: Upload a model
    parameters:
      - {name: Idempotency-Key, in: header, schema: {type: string, maxLength: 128}}
    requestBody:
      content:
        multipart/form-data:
          schema:
            type: object
            required: [model, name, license, targets]
            properties:
              name: {type: string}
              model: {type: string, format: binary}
              license: {type: string, description: SPDX expression}
              card: {type: string, format: binary, description: Markdown model card with YAML front matter}
              targets: {type: string, description: "comma-separated target ids"}
              calibration: {type: string, format: binary, description: .npz samples keyed by input name}
              visibility: {type: string, enum: [public, private]}
              eval_days: {type: integer}
              eval_runs: {type: integer}
              price_per_seat: {type: integer, description: cents}
              options: {type: string, description: 'JSON packager options per target, e.g. {"arm-cpu": {"min_agreement": "0.99"}}'}
    responses:
      202: {description: "{listing, version, jobs: [job id]}", schema: {type: object, required: [listing, version, jobs], properties: {listing: {$ref: "#/components/schemas/Listing"}, version: {type: object}, jobs: {type: array, items: {type: string}}}}}
      403: {description: blocked by the compliance gate (decision included) or not a seller}
      413: {description: too large}
      422: {description: every problem found, in error.problems}
      429: {description: rate limit (Retry-After)}
    """
    return _upload(None)


@bp.post("/listings/<listing_id>/versions")
def upload_version(listing_id: str) -> Any:
    """Publish a new version of your listing (multipart): checked, gated for compliance and packaged per
    target like a first upload. License, card, targets and options default to the previous version's.
    ---
    summary: Publish a new version of a listing (its seller or an admin)
    parameters:
      - {name: listing_id, in: path, required: true, schema: {type: string}}
      - {name: Idempotency-Key, in: header, schema: {type: string, maxLength: 128}}
    requestBody:
      content:
        multipart/form-data:
          schema:
            type: object
            required: [model]
            properties:
              name: {type: string, description: a new display name (the listing id stays)}
              model: {type: string, format: binary}
              license: {type: string, description: SPDX expression}
              card: {type: string, format: binary, description: Markdown model card with YAML front matter}
              targets: {type: string, description: "comma-separated target ids"}
              calibration: {type: string, format: binary, description: .npz samples keyed by input name}
              visibility: {type: string, enum: [public, private]}
              eval_days: {type: integer}
              eval_runs: {type: integer}
              price_per_seat: {type: integer, description: cents}
              options: {type: string, description: 'JSON packager options per target, e.g. {"arm-cpu": {"min_agreement": "0.99"}}'}
    responses:
      202: {description: "{listing, version, jobs: [job id]}"}
      403: {description: blocked by the compliance gate (decision included), or not your listing}
      404: {description: no such listing visible to you}
      409: {description: unpublished listing, or a concurrent upload took the version number}
      413: {description: too large}
      422: {description: every problem found, in error.problems}
      429: {description: rate limit (Retry-After)}
    """
    return _upload(listing_id)


def _upload(listing_id: str | None) -> Response:
    """A first upload (``listing_id`` None) or a new version, answered idempotently."""
    user = require_user()
    if user.role not in ("seller", "admin"):
        raise ForbiddenError("only sellers can upload models")
    if listing_id is not None:
        listings.get_owned(db(), listing_id, user)  # 404/403 before the body is read or counted
    rate_limit("upload", user)
    request.max_content_length = 2 * int(ctx().config["MAX_UPLOAD_BYTES"]) + (1 << 20)

    key = request.headers.get("Idempotency-Key")

    def view() -> Response:
        if key is not None:
            existing = listings.by_idempotency_key(db(), user, key)
            if existing is not None:  # retried after the first attempt's answer was lost
                return _upload_response(
                    existing, listings.job_ids_of(db(), existing.listing, version=existing), user
                )
        if not (request.mimetype or "").startswith("multipart/form-data"):
            raise UsageError("upload must be multipart/form-data with a 'model' file part")
        form, files = request.form, request.files
        card_file = files.get("card")
        upload = listings.UploadForm(
            name=form.get("name"),
            license=form.get("license"),
            card=card_file.stream if card_file is not None else form.get("card"),
            targets=form.get("targets"),
            visibility=form.get("visibility"),
            eval_days=form.get("eval_days"),
            eval_runs=form.get("eval_runs"),
            price_per_seat=form.get("price_per_seat"),
            options=form.get("options"),
            model=files["model"].stream if "model" in files else None,
            calibration=files["calibration"].stream if "calibration" in files else None,
            idempotency_key=key,
            listing=listing_id,
        )
        try:
            result = listings.create_listing(ctx(), db(), user, upload)
        except listings.DuplicateUpload as dup:
            return _upload_response(
                dup.version, listings.job_ids_of(db(), dup.listing, version=dup.version), user
            )
        return _upload_response(result.version, result.job_ids, user)

    return _idempotent(view)


@bp.post("/listings/<listing_id>/repackage")
def repackage_listing(listing_id: str) -> Any:
    """Package one version again (default the newest) for the given targets, with new options or calibration.
    Builds of those targets that no license names are replaced; a licensed build stays (publish a new version).
    ---
    summary: Re-package a version (its seller or an admin)
    parameters: [{name: listing_id, in: path, required: true, schema: {type: string}}]
    requestBody:
      content:
        multipart/form-data:
          schema:
            type: object
            required: [targets]
            properties:
              version: {type: integer, minimum: 1}
              targets: {type: string, description: "comma-separated target ids"}
              options: {type: string, description: 'JSON packager options per target, replacing those targets'' options'}
              calibration: {type: string, format: binary, description: .npz samples keyed by input name}
    responses:
      202: {description: "{listing, version, jobs: [job id]}"}
      403: {description: not your listing}
      404: {description: no such listing or version}
      409: {description: "blocked version, jobs still running, or a licensed build of a named target"}
      422: {description: every problem found, in error.problems}
      429: {description: rate limit (Retry-After)}
    """
    user = require_user()
    listings.get_owned(db(), listing_id, user)
    rate_limit("upload", user)
    request.max_content_length = int(ctx().config["MAX_UPLOAD_BYTES"]) + (1 << 20)
    form, files = request.form, request.files
    result = listings.repackage(
        ctx(),
        db(),
        user,
        listing_id,
        listings.RepackageForm(
            version=form.get("version"),
            targets=form.get("targets"),
            options=form.get("options"),
            calibration=files["calibration"].stream if "calibration" in files else None,
        ),
    )
    return _upload_response(result.version, result.job_ids, user)


def _upload_response(version: ListingVersion, job_ids: list[str], user: Any) -> Response:
    """202 {listing, version, jobs}, or the gate's 403 with its decision for a blocked version."""
    body = {
        "listing": listings.listing_to_dict(version.listing, user),
        "version": listings.version_to_dict(version, user),
        "jobs": job_ids,
    }
    if version.status == "blocked":
        findings = (version.decision or {}).get("findings", [])
        exc = listings.Blocked(
            f"upload blocked by the compliance gate: {_decision_summary(version.decision)}",
            details=findings if isinstance(findings, list) else [],
        )
        exc.body = {"decision": version.decision, **body}  # type: ignore[attr-defined]
        raise exc
    resp = jsonify(body)
    resp.status_code = 202
    return resp


def _decision_summary(decision: dict[str, Any] | None) -> str:
    findings = [f for f in (decision or {}).get("findings") or [] if isinstance(f, dict)]
    blocking = [f for f in findings if f.get("severity") == "block"] or findings
    return "; ".join(str(f.get("message") or f.get("code")) for f in blocking[:3]) or "see the decision"


@bp.get("/listings/<listing_id>")
def get_listing(listing_id: str) -> Any:
    """One listing with its builds and quality reports, and the model card of each version you may see.
    ---
    summary: A listing
    parameters: [{name: listing_id, in: path, required: true, schema: {type: string}}]
    responses: {200: {description: listing (each of its versions with its card), schema: Listing}, 404: {description: absent or not visible to you}}
    """
    user = current_user(required=False)
    return listings.listing_to_dict(listings.get_visible(db(), listing_id, user), user, version_cards=True)


@bp.post("/listings/<listing_id>/unpublish")
def unpublish_listing(listing_id: str) -> Any:
    """Take a listing off the store: no new licenses; the licenses already issued keep running.
    ---
    summary: Unpublish a listing (its seller or an admin)
    parameters: [{name: listing_id, in: path, required: true, schema: {type: string}}]
    responses: {200: {description: the listing, schema: Listing}, 403: {description: not yours}, 409: {description: not listed}}
    """
    user = require_user()
    return listings.listing_to_dict(listings.unpublish(db(), user, listing_id), user)


@bp.delete("/listings/<listing_id>")
def delete_listing(listing_id: str) -> Any:
    """Delete a listing no license was ever issued for (rows and blobs).
    ---
    summary: Delete a never-licensed listing (its seller or an admin)
    parameters: [{name: listing_id, in: path, required: true, schema: {type: string}}]
    responses: {200: {description: "{deleted}"}, 403: {description: not yours}, 409: {description: "licensed (unpublish instead) or being packaged"}}
    """
    listings.delete(ctx(), db(), require_user(), listing_id)
    return {"deleted": listing_id}


@bp.get("/listings/<listing_id>/builds/<target>/quality.html")
def quality_html(listing_id: str, target: str) -> Any:
    """The quality report of one build as a self-contained HTML page (plots inline).
    ---
    summary: Quality report (HTML)
    parameters:
      - {name: listing_id, in: path, required: true, schema: {type: string}}
      - {name: target, in: path, required: true, schema: {type: string}}
      - {name: version, in: query, schema: {type: integer, minimum: 1}, description: "default: the current version"}
    responses: {200: {description: text/html}, 400: {description: bad version}, 404: {description: no report}}
    """
    user = current_user(required=False)
    listing = listings.get_visible(db(), listing_id, user)
    details = listings.shows_build_details(listing, user)
    raw = request.args.get("version")
    version = listing.current if raw is None else listings.get_version(listing, raw)
    if version not in listings.visible_versions(listing, user):
        raise NotFoundError(f"no version {version.number} of {listing.id}")
    for build in version.builds:
        if (
            build.target == target
            and build.quality_html_blob
            and listings.build_outcome(build, details=details)["report"]
        ):
            resp = Response(ctx().blobs.get(build.quality_html_blob), mimetype="text/html")
            # The report is ours but rendered from seller-controlled names: no scripts, no framing elsewhere.
            resp.headers["Content-Security-Policy"] = (
                "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'self'"
            )
            return resp
    raise NotFoundError(f"no quality report for target {target[:40]!r} of {listing.id}")


@bp.post("/listings/<listing_id>/review")
@roles("admin")
def review_listing(listing_id: str) -> Any:
    """Admin decision on a blocked upload.
    ---
    summary: Approve or reject a blocked upload (admin)
    parameters: [{name: listing_id, in: path, required: true, schema: {type: string}}]
    requestBody: {content: {application/json: {schema: {type: object, properties: {action: {type: string, enum: [approve, reject]}, note: {type: string}, version: {type: integer, minimum: 1, description: "default: the newest blocked version"}}}}}}
    responses: {200: {description: "{listing, jobs}"}}
    """
    body = json_body()
    note = body.get("note", "")
    if not isinstance(note, str):
        raise UsageError("note must be a string")
    jobs = listings.review(
        ctx(),
        db(),
        require_user(),
        listing_id,
        body.get("action"),
        note,
        body.get("version"),  # type: ignore[arg-type]
    )
    listing = db().get(Listing, listing_id)
    return {"listing": listings.listing_to_dict(listing, require_user()), "jobs": jobs}  # type: ignore[arg-type]


@bp.get("/listings/<listing_id>/usage")
def listing_usage(listing_id: str) -> Any:
    """Usage figures for the listing's seller, from verified device logs.
    ---
    summary: Per-listing usage (seller or admin)
    parameters: [{name: listing_id, in: path, required: true, schema: {type: string}}]
    responses: {200: {description: "{listing, licenses, devices, totals, by_target}"}, 403: {description: not your listing}}
    """
    listing = listings.get_owned(db(), listing_id, require_user())
    return usage.listing_usage(db(), listing)


# ------------------------------------------------------------------------------------------ jobs


@bp.get("/jobs")
def list_jobs() -> Any:
    """Jobs, newest first; state=dead is the dead-letter view (jobs that used up their attempts).
    ---
    summary: Jobs (admins see all; sellers the jobs of their own listings)
    parameters:
      - {name: state, in: query, schema: {type: string, enum: [queued, running, done, failed, dead]}}
      - {name: page, in: query, schema: {type: integer, minimum: 1}}
    responses: {200: {description: "{items: [job], page, pages}", schema: JobPage}, 403: {description: not a seller or admin}}
    """
    user = require_user()
    if user.role not in ("seller", "admin"):
        raise ForbiddenError(f"a {user.role} account has no jobs")
    page = _page()
    items, pages = packaging.search_jobs(
        db(), user, state=request.args.get("state"), page=page, page_size=int(ctx().config["PAGE_SIZE"])
    )
    return {"items": [packaging.job_to_dict(j) for j in items], "page": page, "pages": pages}


@bp.get("/jobs/<job_id>")
def get_job(job_id: str) -> Any:
    """Progress of a packaging job.
    ---
    summary: A job (the listing's seller or an admin)
    parameters: [{name: job_id, in: path, required: true, schema: {type: string}}]
    responses: {200: {description: "{id, state, progress, message, error, listing, target, attempts}", schema: Job}, 404: {description: not found}}
    """
    return packaging.job_to_dict(packaging.get_visible_job(db(), require_user(), job_id))


@bp.post("/jobs/<job_id>/retry")
@roles("admin")
def retry_job(job_id: str) -> Any:
    """Send a dead-lettered or failed job back to the queue with fresh attempts.
    ---
    summary: Retry a dead or failed job (admin)
    parameters: [{name: job_id, in: path, required: true, schema: {type: string}}]
    responses: {200: {description: the job, schema: Job}, 404: {description: not found}, 409: {description: "not dead or failed"}}
    """
    job = packaging.requeue_dead(ctx(), job_id)
    return packaging.job_to_dict(packaging.get_visible_job(db(), require_user(), job.id))


# ------------------------------------------------------------------------------------------ devices & licenses


@bp.post("/devices/enroll")
def enroll_device() -> Any:
    """Certify a device's own keys (CSR); the device belongs to the token's user.
    ---
    summary: Enroll a device
    requestBody: {content: {application/json: {schema: {type: object, required: [csr], properties: {csr: {type: string}, name: {type: string}}}}}}
    responses: {201: {description: "{device_id, certificate, root}", schema: Enrolled}, 200: {description: re-enrolled, schema: Enrolled}, 409: {description: device owned by another account}}
    """
    user = require_user()
    body = json_body()
    device, created = licensing.enroll(ctx(), db(), user, body.get("csr"), body.get("name"))
    return {
        "device_id": device.device_id,
        "certificate": device.cert_pem,
        "root": ctx().root_cert_pem().decode(),
    }, (201 if created else 200)


@bp.get("/devices")
def list_devices() -> Any:
    """Your enrolled devices.
    ---
    summary: My devices
    responses: {200: {description: "{items: [device]}", schema: DeviceList}}
    """
    from sqlalchemy import select

    from store.models import Device

    user = require_user()
    rows = db().scalars(select(Device).where(Device.owner_id == user.id).order_by(Device.enrolled_at))
    return {"items": [licensing.device_to_dict(d) for d in rows]}


@bp.post("/devices/<device_id>/usage")
def upload_usage(device_id: str) -> Any:
    """Upload the device's usage log (the whole log or its new tail); the chain and signatures are verified.
    ---
    summary: Usage-log sync
    parameters: [{name: device_id, in: path, required: true, schema: {type: string}}]
    requestBody: {content: {application/x-ndjson: {schema: {type: string}}}}
    responses: {200: {description: "{ok, accepted, first_bad, reason, held, budgets}: budgets are signed grants renewing each metered license's offline budget", schema: UsageResult}, 403: {description: not your device}, 409: {description: "the device's usage log forked (restored or cloned state): its licenses are revoked, check-ins refused"}, 413: {description: too large}}
    """
    user = require_user()
    device = licensing.get_own_device(db(), user, device_id)
    request.max_content_length = int(ctx().config["MAX_USAGE_BYTES"])
    result = usage.upload(ctx(), db(), device, request.get_data(cache=False))
    result["budgets"] = metering.budget_grants(ctx(), db(), device, result["held"])
    return result


@bp.put("/listings/<listing_id>/metering")
def set_listing_metering(listing_id: str) -> Any:
    """The offline budget of the listing's future evaluation licenses (seller or admin).
    ---
    summary: Offline budget of a listing
    parameters: [{name: listing_id, in: path, required: true, schema: {type: string}}]
    requestBody: {content: {application/json: {schema: {type: object, required: [offline_runs, offline_hours], properties: {offline_runs: {type: integer}, offline_hours: {type: integer}}}}}}
    responses: {200: {description: "{listing, runs, hours}"}, 403: {description: not the seller}}
    """
    return metering.set_offline_budget(ctx(), db(), require_user(), listing_id, json_body())


@bp.get("/forks")
def list_forks() -> Any:
    """Forks of device usage logs (two signed records for one position): admins all, sellers those of devices
    holding licenses on their listings, buyers their own devices'.
    ---
    summary: Usage-log forks
    responses: {200: {description: "{items: [{id, device_id, seq, held, offered, revoked, detected_at}]}"}}
    """
    return {"items": [metering.fork_to_dict(f) for f in metering.visible_forks(db(), require_user())]}


@bp.post("/listings/<listing_id>/eval-license")
def eval_license(listing_id: str) -> Any:
    """An evaluation license for one of your enrolled devices (the same one again on a re-request).
    ---
    summary: Evaluation license
    parameters: [{name: listing_id, in: path, required: true, schema: {type: string}}]
    requestBody: {content: {application/json: {schema: {type: object, required: [device_id, target], properties: {device_id: {type: string}, target: {type: string}, version: {type: integer, minimum: 1, description: "pin a listed version (default: the newest with this target)"}}}}}}
    responses:
      201: {description: "{license, license_id, build_hash, build_url}", schema: License}
      200: {description: the license issued before, unchanged, schema: License}
      403: {description: device limit reached or revoked}
      429: {description: rate limit (Retry-After)}
    """
    user = require_user()
    rate_limit("license", user)
    body = json_body()
    lic, created = licensing.eval_license(
        ctx(), db(), user, listing_id, body.get("device_id"), body.get("target"), body.get("version")
    )
    return licensing.license_to_dict(lic, with_token=True), (201 if created else 200)


@bp.post("/listings/<listing_id>/production-licenses")
def production_licenses(listing_id: str) -> Any:
    """Production licenses for a firmware builder: per device certificate, or one for a fleet key.
    ---
    summary: Production licenses (builder)
    parameters: [{name: listing_id, in: path, required: true, schema: {type: string}}]
    requestBody:
      content:
        application/json:
          schema:
            type: object
            required: [target]
            properties:
              target: {type: string}
              version: {type: integer, minimum: 1, description: "pin a listed version (default: the newest with this target)"}
              device_certs: {type: array, items: {type: string}}
              fleet_key: {type: string, description: PEM X25519 public key}
              seats: {type: integer}
    responses: {201: {description: "{licenses: [...]}"}, 429: {description: rate limit (Retry-After)}}
    """
    user = require_user()
    rate_limit("license", user)
    body = json_body()
    rows = licensing.production_licenses(ctx(), db(), user, listing_id, body)
    return {"licenses": [licensing.license_to_dict(r, with_token=True) for r in rows]}, 201


@bp.post("/licenses/<license_id>/activations")
def activate_seat(license_id: str) -> Any:
    """Activate one seat of a fleet license for a device (the license holder asks; idempotent per device).
    ---
    summary: Seat activation
    parameters: [{name: license_id, in: path, required: true, schema: {type: string}}]
    requestBody:
      content:
        application/json:
          schema: {type: object, required: [device_id], properties: {device_id: {type: string}}}
    responses: {201: {description: "a new activation"}, 200: {description: "the device's existing activation"},
      400: {description: "device_id is not 32 hex, or the license is not a fleet license"},
      403: {description: "the device's activation was revoked (a fork)"},
      404: {description: "no such license, or not the caller's"}, 409: {description: "every seat is taken"}}
    """
    user = require_user()
    rate_limit("license", user)
    body = json_body()
    row, created = licensing.activate_seat(ctx(), db(), user, license_id, body.get("device_id"))
    db().commit()
    return licensing.activation_to_dict(row), (201 if created else 200)


@bp.get("/licenses")
def list_licenses() -> Any:
    """Licenses you hold (buyers), licenses on your listings (sellers, without tokens), all (admins).
    ---
    summary: Licenses
    responses: {200: {description: "{items: [license]}", schema: LicenseList}}
    """
    user = require_user()
    rows = licensing.visible_licenses(db(), user)
    return {"items": [licensing.license_to_dict(r, with_token=r.buyer_id == user.id) for r in rows]}


@bp.get("/licenses/<license_id>")
def get_license(license_id: str) -> Any:
    """One license (the token only for its holder).
    ---
    summary: A license
    parameters: [{name: license_id, in: path, required: true, schema: {type: string}}]
    responses: {200: {description: license, schema: License}, 404: {description: not found}}
    """
    user = require_user()
    lic = licensing.get_license(db(), user, license_id)
    return licensing.license_to_dict(lic, with_token=lic.buyer_id == user.id)


@bp.post("/licenses/<license_id>/revoke")
@roles("admin")
def revoke_license(license_id: str) -> Any:
    """Revoke a license: a new signed revocation list with a higher version is published.
    ---
    summary: Revoke (admin)
    parameters: [{name: license_id, in: path, required: true, schema: {type: string}}]
    responses: {200: {description: "{license_id, revocation_version}"}}
    """
    row = licensing.revoke(ctx(), db(), require_user(), license_id)
    return {"license_id": license_id, "revocation_version": row.version}


@bp.get("/revocations")
def revocations() -> Any:
    """The signed, versioned revocation list (public: devices verify it against the pinned root).
    ---
    summary: Revocation list
    responses: {200: {description: signed list bytes, content: {application/octet-stream: {}}}}
    """
    row = licensing.current_revocations(ctx(), db())
    resp = Response(row.token, mimetype="application/octet-stream")
    resp.headers["X-Revocation-Version"] = str(row.version)
    return resp


@bp.get("/root.crt")
def root_certificate() -> Any:
    """The store's root CA certificate (PEM), to pin on devices.
    ---
    summary: Root certificate
    responses: {200: {description: PEM, content: {application/x-pem-file: {}}}}
    """
    return Response(ctx().root_cert_pem(), mimetype="application/x-pem-file")


@bp.get("/builds/<build_id>")
def download_build(build_id: str) -> Any:
    """The encrypted container of a build (for license holders, the seller and admins).
    ---
    summary: Encrypted build
    parameters: [{name: build_id, in: path, required: true, description: hex of the build hash, schema: {type: string}}]
    responses: {200: {description: container bytes, content: {application/octet-stream: {}}}, 403: {description: no license}}
    """
    user = require_user()
    build = licensing.build_for_download(db(), user, build_id)
    assert build.blob_key is not None
    resp = send_file(
        ctx().blobs.open(build.blob_key),
        mimetype="application/octet-stream",
        download_name=f"{build_id}.emdl",
        as_attachment=True,
        max_age=0,
    )
    resp.headers["X-Build-Hash"] = build.build_hash or ""
    return resp
