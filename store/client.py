"""A small HTTP client for the store API (stdlib urllib only): JSON calls, streamed multipart uploads,
job polling, and a firmware builder's calls (buy production seats, fetch the inputs of `bundle build`).
Store errors come back as the matching EdgemartError subclass with the store's message."""

from __future__ import annotations

import json
import mimetypes
import os
import secrets
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemart.core.errors import (
    AuthError,
    ConflictError,
    EdgemartError,
    ForbiddenError,
    NotFoundError,
    Refusal,
    UsageError,
)

CHUNK = 1 << 20
# A job in one of these states will not change again by itself (dead: its attempts are used up).
FINAL_JOB_STATES = ("done", "failed", "dead")


class StoreUnavailable(EdgemartError):
    """The store could not be reached or failed."""

    exit_code = 1
    http_status = 502
    code = "store_unavailable"


class StoreRefusal(Refusal):
    """The store refused (a block decision, a revoked license, a limit); the store's body is attached."""


@dataclass
class StoreResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def error_from(status: int, body: bytes) -> EdgemartError:
    """The EdgemartError for a store error response (message from its JSON error body)."""
    try:
        doc = json.loads(body)
        err = doc.get("error", {}) if isinstance(doc, dict) else {}
    except ValueError:
        doc, err = {}, {}
    message = str(err.get("message") or f"store answered HTTP {status}")
    code = str(err.get("code") or "")
    problems = err.get("problems") if isinstance(err.get("problems"), list) else []
    cls: type[EdgemartError]
    if status == 401:
        cls = AuthError
    elif status == 403 and code in ("blocked", "refused", "license_refused", "integrity"):
        cls = StoreRefusal
    elif status == 403:
        cls = ForbiddenError
    elif status == 404:
        cls = NotFoundError
    elif status == 409:
        cls = ConflictError
    elif 400 <= status < 500:
        cls = UsageError
    else:
        cls = StoreUnavailable
    exc = cls(message, code=code or None, details=problems)
    exc.body = doc if isinstance(doc, dict) else {}  # type: ignore[attr-defined]
    exc.status = status  # type: ignore[attr-defined]
    return exc


def _multipart(fields: dict[str, str], files: dict[str, Path], boundary: str) -> tuple[Iterator[bytes], int]:
    """A streamed multipart/form-data body and its exact length (files are read in chunks, never whole)."""
    parts: list[tuple[bytes, Path | None, bytes]] = []
    for name, value in fields.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        parts.append((head, None, value.encode() + b"\r\n"))
    for name, path in files.items():
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        safe = path.name.replace('"', "_").replace("\r", "_").replace("\n", "_")
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{safe}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n"
        ).encode()
        parts.append((head, path, b"\r\n"))
    tail = f"--{boundary}--\r\n".encode()
    total = len(tail) + sum(len(h) + len(t) + (p.stat().st_size if p else 0) for h, p, t in parts)

    def gen() -> Iterator[bytes]:
        for head, path, trailer in parts:
            yield head
            if path is not None:
                with open(path, "rb") as fh:
                    while chunk := fh.read(CHUNK):
                        yield chunk
            yield trailer
        yield tail

    return gen(), total


class StoreClient:
    def __init__(self, url: str, token: str | None = None, *, timeout: float = 300.0) -> None:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise UsageError(f"store URL must be http(s)://host[:port], got {url!r}")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
    ) -> StoreResponse:
        hdrs = {"Accept": "application/json", **(headers or {})}
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        if json_body is not None:
            data = json.dumps(json_body).encode()
            hdrs["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return StoreResponse(resp.status, dict(resp.headers), resp.read())
        except urllib.error.HTTPError as exc:
            raise error_from(exc.code, exc.read()) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise StoreUnavailable(f"cannot reach the store at {self.url}: {reason}") from None

    def get_json(self, path: str) -> Any:
        return self.request("GET", path).json()

    def post_json(self, path: str, body: Any) -> Any:
        return self.request("POST", path, json_body=body).json()

    def upload(
        self,
        model: Path,
        *,
        name: str | None,
        license: str | None,
        targets: list[str],
        card: Path | None = None,
        calibration: Path | None = None,
        extra: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        listing: str | None = None,
    ) -> dict[str, Any]:
        """POST /api/v1/listings (or, with ``listing``, a new version of it); returns {"listing", "version",
        "jobs"}. A block decision raises StoreRefusal. Empty fields are left out (the store's defaults)."""
        fields = {"name": name or "", "license": license or "", "targets": ",".join(targets), **(extra or {})}
        files = {"model": Path(model), "card": card, "calibration": calibration}
        path = "/api/v1/listings"
        if listing is not None:
            path += f"/{urllib.parse.quote(listing, safe='')}/versions"
        headers = {"Idempotency-Key": idempotency_key or secrets.token_hex(16)}
        return self.post_multipart(path, fields, files, headers=headers)  # type: ignore[no-any-return]

    def post_multipart(
        self,
        path: str,
        fields: dict[str, str],
        files: dict[str, Path | None],
        *,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """POST a streamed multipart/form-data body (empty fields and absent files left out); the JSON answer."""
        for label, file in files.items():
            if file is not None and not Path(file).is_file():
                raise UsageError(f"{label} file not found: {file}")
        boundary = "edgemart-" + secrets.token_hex(16)
        body, length = _multipart(
            {k: v for k, v in fields.items() if v},
            {k: Path(v) for k, v in files.items() if v is not None},
            boundary,
        )
        return self.request(
            "POST",
            path,
            data=body,
            headers={
                "Content-Type": f"multipart/form-data; boundary={boundary}",
                "Content-Length": str(length),
                **(headers or {}),
            },
        ).json()

    def wait_jobs(
        self,
        job_ids: list[str],
        *,
        poll: float = 1.0,
        timeout: float = 3600.0,
        on_update: Callable[[dict[str, dict[str, Any]]], None] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Poll jobs until each has ended (FINAL_JOB_STATES); returns the last state of each."""
        deadline = time.monotonic() + timeout
        states: dict[str, dict[str, Any]] = {}
        while True:
            for job_id in job_ids:
                if states.get(job_id, {}).get("state") not in FINAL_JOB_STATES:
                    states[job_id] = self.get_json(f"/api/v1/jobs/{urllib.parse.quote(job_id)}")
            if on_update is not None:
                on_update(states)
            if all(s.get("state") in FINAL_JOB_STATES for s in states.values()):
                return states
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"jobs still running after {timeout:.0f} s")
            time.sleep(poll)

    # ------------------------------------------------------------------ a firmware builder's calls

    def buy_production_licenses(
        self,
        listing: str,
        *,
        target: str,
        version: int | None = None,
        fleet_key_pem: str | None = None,
        seats: int | None = None,
        device_cert_pems: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        """POST /listings/ID/production-licenses: seats for one fleet key, or one license per device
        certificate; returns the issued licenses (each with its token under "license")."""
        body: dict[str, Any] = {"target": target}
        if version is not None:
            body["version"] = version
        if fleet_key_pem is not None:
            body["fleet_key"] = fleet_key_pem
            body["seats"] = seats
        else:
            body["device_certs"] = device_cert_pems or []
        path = f"/api/v1/listings/{urllib.parse.quote(listing, safe='')}/production-licenses"
        return self.post_json(path, body)["licenses"]  # type: ignore[no-any-return]

    def production_licenses(
        self, *, license_ids: list[str] | None = None, listing: str | None = None
    ) -> list[dict[str, Any]]:
        """This account's usable production licenses (token present, not revoked), optionally only the
        given ids (each must be one of them) and only one listing's."""
        held = [
            it
            for it in self.get_json("/api/v1/licenses")["items"]
            if it.get("kind") == "production" and it.get("license") and not it.get("revoked")
        ]
        if license_ids:
            wanted = set(license_ids)
            missing = wanted - {it["license_id"] for it in held}
            if missing:
                raise UsageError(f"no usable production license {', '.join(sorted(missing))} on this account")
            held = [it for it in held if it["license_id"] in wanted]
        if listing:
            held = [it for it in held if it["listing"] == listing]
        return held

    def download_build(self, build_hash: str, url: str) -> bytes:
        """A sealed build's bytes, its header checked to be the build ``build_hash``."""
        import drm

        data = self.request("GET", url, headers={"Accept": "application/octet-stream"}).body
        if drm.read_header(data[:65536]).build_hash != build_hash:
            raise EdgemartError(f"the store sent another build than {build_hash} for {url}")
        return data

    def listing_card(self, listing: str, version: int | None = None) -> str | None:
        """The model card of one version of a listing (default: its current version); None if that version
        has none or is not visible to this account. A store that predates version cards in its listing
        answer gives the current version's card, as `bundle fetch` always wrote before."""
        doc = self.get_json(f"/api/v1/listings/{urllib.parse.quote(listing, safe='')}")
        entries = [e for e in doc.get("versions") or [] if isinstance(e, dict)]
        if version is None or not any("card" in e for e in entries):
            return doc.get("card") or None
        return next((e.get("card") or None for e in entries if e.get("number") == version), None)

    def root_certificate(self) -> bytes:
        return self.request("GET", "/api/v1/root.crt").body

    def fetch_bundle_inputs(
        self, out: Path, *, license_ids: list[str] | None = None, listing: str | None = None
    ) -> dict[str, list[str]]:
        """Write out/licenses/<id>.lic, out/builds/<hex>.emdl (header checked against the license),
        out/cards/<listing>.md and out/root.crt: exactly what `bundle build` reads. All or nothing: the
        files are gathered in a staging directory beside ``out`` and renamed into place at the end."""
        held = self.production_licenses(license_ids=license_ids, listing=listing)
        if not held:
            raise UsageError("no production licenses to fetch (buy seats first: edgemart bundle buy)")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UsageError(f"--out {out} exists and is not an empty directory")
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            written = self._fetch_into(held, stage)
            if out.exists():
                out.rmdir()
            os.replace(stage, out)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        return written

    def _fetch_into(self, held: list[dict[str, Any]], out: Path) -> dict[str, list[str]]:
        from edgemart.core.fileio import atomic_write

        for sub in ("licenses", "builds", "cards"):
            (out / sub).mkdir()
        written: dict[str, list[str]] = {"licenses": [], "builds": [], "cards": []}
        for it in sorted(held, key=lambda x: x["license_id"]):
            atomic_write(out / "licenses" / f"{it['license_id']}.lic", it["license"].encode(), mode=0o644)
            written["licenses"].append(it["license_id"])
        for build_hash, url in sorted({(it["build_hash"], it["build_url"]) for it in held}):
            name = build_hash.split(":", 1)[-1] + ".emdl"
            atomic_write(out / "builds" / name, self.download_build(build_hash, url), mode=0o644)
            written["builds"].append(name)
        # One card per listing (`bundle build --cards` reads <listing>.md): the card of the licensed version,
        # the newest one if this account holds licenses for several versions of the listing.
        versions: dict[str, list[int]] = {}
        for it in held:
            versions.setdefault(it["listing"], [])
            if isinstance(it.get("version"), int):
                versions[it["listing"]].append(it["version"])
        for listing, numbers in sorted(versions.items()):
            card = self.listing_card(listing, max(numbers, default=None))
            if card:
                atomic_write(out / "cards" / f"{listing}.md", card.encode(), mode=0o644)
                written["cards"].append(listing)
        atomic_write(out / "root.crt", self.root_certificate(), mode=0o644)
        return written


def env_token() -> str | None:
    return os.environ.get("EDGEMART_TOKEN")
