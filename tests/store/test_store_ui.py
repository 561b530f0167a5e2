"""The web UI end to end in headless Chromium (Playwright) against a real store server on 127.0.0.1:
seller upload with live job progress, listing page with the quality report, buyer licenses and devices,
admin review; a firmware builder buying fleet seats and downloading the token and bundle inputs.
Screenshots go to test-artifacts/ui/ (gitignored)."""

from __future__ import annotations

import json
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.store.conftest import PASSWORDS, Store, make_store, serve_http

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _playwright() -> Any:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (make apt) to run the UI test")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -e '.[dev]')")
    return sync_playwright


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Store, str]]:
    """A store served over real HTTP by werkzeug in a thread (threaded: the listing page polls jobs)."""
    with tempfile.TemporaryDirectory(prefix="edgemart-ui-") as tmp:
        st = make_store(Path(tmp))
        try:
            with serve_http(st.app) as url:
                yield st, url
        finally:
            st.ctx.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_playwright = _playwright()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgemart-chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield context
        finally:
            context.close()


def _api(base: str, path: str, token: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status in (200, 201)
        return json.loads(resp.read())  # type: ignore[no-any-return]


def _login(page: Any, base: str, name: str, password: str | None = None) -> None:
    page.context.clear_cookies()
    page.goto(f"{base}/login")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", password or PASSWORDS[name])
    page.click("form button[type=submit]")
    page.wait_for_selector(f"text=Sign out {name}")


def _shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_ui_seller_buyer_admin(
    served: tuple[Store, str], browser: Any, digits_base: Path, digits_calibration: Path
) -> None:
    import drm

    st, base = served
    page = browser.new_page()
    page.set_default_timeout(60_000)

    # A wrong password is refused on the page itself.
    page.goto(f"{base}/login")
    page.fill("input[name=name]", "sally")
    page.fill("input[name=password]", "not-her-password")
    page.click("form button[type=submit]")
    assert page.locator("p.error").is_visible()
    assert "Sign out" not in page.inner_text("header")

    # Seller: upload the digits model through the form, for two targets, with calibration data.
    _login(page, base, "sally")
    page.click("header >> text=Sell")
    assert page.inner_text("h1") == "Sell a model"
    page.fill("input[name=name]", "UI digits")
    page.fill("input[name=license]", "MIT")
    page.set_input_files("input[name=model]", str(digits_base))
    page.set_input_files("input[name=calibration]", str(digits_calibration))
    page.check("input[name=targets][value=onnx-fp32]")
    page.check("input[name=targets][value=arm-cpu]")
    _shot(page, "01-seller-upload-form")
    page.click("form button[type=submit]:has-text('Upload')")
    page.wait_for_url("**/listings/*")
    assert page.inner_text("h1") == "UI digits"
    assert "by sally" in page.inner_text("main")
    listing_id = page.url.split("/listings/")[1].split("?")[0]
    _shot(page, "02-seller-listing-progress")

    # The page polls the jobs and reloads once they are all finished: both builds end up "done".
    for target in ("onnx-fp32", "arm-cpu"):
        status = page.locator(f'[data-build-status="{target}"]')
        status.filter(has_text="done").wait_for(timeout=120_000)
    page.wait_for_load_state()
    assert page.locator("progress").count() == 0
    main = page.inner_text("main")
    assert "Compliance decision: allow" in main
    assert f"edgemart device fetch {listing_id} --target arm-cpu" in main
    # The quality report renders in its sandboxed iframe.
    frame = page.frame_locator('iframe[title="quality report arm-cpu"]')
    report = frame.locator("body").inner_text(timeout=30_000)
    assert "agreement" in report.lower()
    _shot(page, "03-seller-listing-done")

    # Buyer: sees the listing in the catalogue, enrolls a board and takes an eval license (API), then
    # finds both on the licenses & devices page.
    _login(page, base, "bob")
    page.goto(f"{base}/?q=UI+digits")
    row = page.locator("table.listings tbody tr", has_text="UI digits")
    assert row.count() == 1
    assert "sally" in row.inner_text() and "MIT" in row.inner_text() and "arm-cpu" in row.inner_text()
    _shot(page, "04-buyer-catalogue")
    page.click("table.listings >> text=UI digits")
    assert page.inner_text("h1") == "UI digits"
    assert page.locator("script").count() == 0  # job polling is for the owner only

    keys = drm.DeviceKeys.generate()
    enrolled = _api(
        base,
        "/api/v1/devices/enroll",
        st.tokens["bob"],
        {"csr": keys.csr().decode(), "name": "bench-board"},
    )
    assert enrolled["device_id"] == keys.device_id
    lic = _api(
        base,
        f"/api/v1/listings/{listing_id}/eval-license",
        st.tokens["bob"],
        {"device_id": keys.device_id, "target": "arm-cpu"},
    )
    page.click("header >> text=Licenses & devices")
    main = page.inner_text("main")
    assert keys.device_id in main and "bench-board" in main
    lic_row = page.locator("tr", has_text=lic["license_id"])
    assert lic_row.count() == 1
    cells = lic_row.inner_text()
    assert "eval" in cells and listing_id in cells and "arm-cpu" in cells and "valid" in cells
    assert "Sell" not in page.inner_text("header nav")  # buyers get no seller pages
    _shot(page, "05-buyer-licenses-devices")

    # Admin: the review page (nothing blocked in this flow) and the full navigation.
    _login(page, base, "ada")
    page.click("header >> text=Review")
    assert page.inner_text("h1") == "Blocked uploads"
    assert "Nothing to review." in page.inner_text("main")
    nav = page.inner_text("header nav")
    assert all(x in nav for x in ("Sell", "Usage", "Review", "Sign out ada"))
    _shot(page, "06-admin-review")

    # A buyer is refused the admin page with a readable error.
    _login(page, base, "bob")
    resp = page.goto(f"{base}/admin/review")
    assert resp is not None and resp.status == 403
    assert "admin" in page.inner_text("p.error")
    _shot(page, "07-buyer-forbidden")
    page.close()


def test_ui_builder_buys_fleet_seats_and_downloads(
    served: tuple[Store, str], browser: Any, corpus: Path
) -> None:
    import time
    import zipfile

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import x25519

    import drm
    from store.models import User
    from store.services import accounts

    st, base = served
    # Its own model: a build identical to one packaged by the walk-through above would be refused.
    model = corpus / "models" / "digits" / "digits_mlp_independent.onnx"
    r = st.upload("sally", model, name="UI fleet digits", targets="onnx-fp32", price_per_seat=125)
    assert r.status_code == 202, r.json
    listing_id = r.json["listing"]["id"]
    st.wait()
    got = st.client.get(f"/api/v1/listings/{listing_id}", headers=st.auth("sally")).json
    assert got["status"] == "listed", got
    with st.ctx.Session() as s:
        accounts.set_password(s, s.query(User).filter_by(name="bill").one(), "pw-bill-12345")
        s.commit()
    fleet = x25519.X25519PrivateKey.generate().public_key()
    kid = drm.key_id(fleet.public_bytes_raw())
    with tempfile.TemporaryDirectory(prefix="edgemart-ui-fleet-") as tmp:
        key_file = Path(tmp) / "fleet.pub.pem"
        key_file.write_bytes(
            fleet.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        page = browser.new_page()
        page.set_default_timeout(60_000)
        _login(page, base, "bill", "pw-bill-12345")
        page.goto(f"{base}/listings/{listing_id}")
        section = page.locator("#production-seats")
        assert "Seats cost 1.25 each" in section.inner_text()
        section.locator("select[name=target]").select_option("onnx-fp32")
        section.locator("input[name=mode][value=fleet]").check()
        section.locator("input[name=fleet_key_file]").set_input_files(str(key_file))
        section.locator("input[name=seats]").fill("120")
        _shot(page, "08-builder-seat-form")
        # Buttons below the quality-report iframe are pressed from the keyboard: after a full-page
        # screenshot, headless Chromium hit-tests mouse clicks there against stale geometry.
        section.locator("button:has-text('Review order')").press("Enter")

        # The price is on the page before anything is bought: 120 seats at 1.25.
        page.wait_for_selector("#order-summary")
        assert page.inner_text("[data-order-total]") == "150.00"
        assert "120" in page.inner_text("[data-order-seats]")
        _shot(page, "09-builder-order-review")
        page.locator("button:has-text('Confirm purchase')").press("Enter")
        page.wait_for_url("**/me/licenses#production")
        assert "1 production license(s)" in page.inner_text("p.flash")
        row = page.locator("table.production tr", has_text=kid)
        assert row.count() == 1
        cells = row.inner_text()
        assert listing_id in cells and "onnx-fp32" in cells and "120" in cells and "valid" in cells
        _shot(page, "10-builder-production-licenses")

        with page.expect_download() as download:
            row.locator("text=license token").click()
        token = Path(download.value.path()).read_bytes()
        assert download.value.suggested_filename.endswith(".lic")
        root = drm.cert_from_bytes(st.ctx.root_cert_pem())
        claims = drm.verify_license(
            token, root=root, now=int(time.time()), fleet_key_ids=frozenset({kid})
        ).claims
        assert claims.listing == listing_id and claims.kind == "production"

        # Only this license checked: the ZIP holds it, its sealed build, the model card dir and the root.
        boxes = page.locator("table.production input[name=license]")
        for i in range(boxes.count()):
            if boxes.nth(i).get_attribute("value") != claims.license_id:
                boxes.nth(i).uncheck()
        with page.expect_download() as download:
            page.click("button:has-text('Download bundle inputs (ZIP)')")
        with zipfile.ZipFile(download.value.path()) as zf:
            names = set(zf.namelist())
        assert {f"licenses/{claims.license_id}.lic", "root.crt", "README.txt"} <= names
        assert f"builds/{claims.build_hash[7:]}.emdl" in names
        page.close()
