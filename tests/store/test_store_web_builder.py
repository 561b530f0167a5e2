"""A firmware builder's whole job through the web UI (Flask test client): buy production seats on a listing
page (fleet key or device certificates, price reviewed before confirming), list them, download the tokens
and a ZIP that `edgemart bundle build` turns into a bundle that verifies against the store root."""

from __future__ import annotations

import io
import re
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from flask.testing import FlaskClient

import drm
from edgemart.cli import main as edgemart_main
from store.models import User
from store.services import accounts
from tests.store.conftest import Store, make_store

LISTING = "fleet-digits"
TARGET = "onnx-fp32"
PRICE = 250  # cents per seat
PASSWORDS = {
    "bill": "pw-bill-12345",
    "bert": "pw-bert-12345",
    "bob": "pw-bob-12345",
    "sally": "pw-sally-12345",
}
CARD = "---\nlicense: MIT\ndatasets:\n  - uci/optdigits\n---\n# Fleet digits\n\nDigits for the fleet.\n"


@pytest.fixture(scope="module")
def shop(digits_base: Path) -> Iterator[Store]:
    """A store with one listed, packaged listing priced per seat, and two builders who can sign in."""
    with tempfile.TemporaryDirectory(prefix="edgemart-builder-") as tmp:
        st = make_store(Path(tmp))
        with st.ctx.Session() as s:
            bill = s.query(User).filter_by(name="bill").one()
            accounts.set_password(s, bill, PASSWORDS["bill"])
            bert = accounts.create_user(s, "bert", "builder", now=st.ctx.now(), password=PASSWORDS["bert"])
            st.tokens["bert"] = accounts.issue_token(s, bert, now=st.ctx.now())
            s.commit()
        r = st.upload(
            "sally", digits_base, name="Fleet digits", targets=TARGET, card=CARD, price_per_seat=PRICE
        )
        assert r.status_code == 202, r.json
        st.wait()
        assert st.client.get(f"/api/v1/listings/{LISTING}").json["status"] == "listed"
        try:
            yield st
        finally:
            st.ctx.close()


def _csrf(client: FlaskClient, path: str = "/login") -> str:
    page = client.get(path).get_data(as_text=True)
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found is not None, page
    return found.group(1)


def _login(st: Store, name: str) -> tuple[FlaskClient, str]:
    client = st.app.test_client()
    token = _csrf(client)
    r = client.post("/login", data={"name": name, "password": PASSWORDS[name], "csrf_token": token})
    assert r.status_code == 302, r.data
    return client, _csrf(client, "/")  # signing in starts a new session with a new token


def _licenses(st: Store) -> int:
    return st.counts()["licenses"]


def _fleet_key() -> tuple[str, str]:
    """A fleet's X25519 public key as PEM, and its key id as licenses name it."""
    public = x25519.X25519PrivateKey.generate().public_key()
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem.decode(), drm.key_id(public.public_bytes_raw())


def _device_cert() -> tuple[str, str]:
    """A factory-floor device certificate (self-signed by the device key) and the device id."""
    keys = drm.DeviceKeys.generate()
    return drm.cert_to_pem(keys.self_signed_cert(now=int(time.time()) - 3600)).decode(), keys.device_id


def _order(client: FlaskClient, csrf: str | None, step: str, **fields: Any) -> Any:
    data = {"target": TARGET, "step": step, **fields}
    if csrf is not None:
        data["csrf_token"] = csrf
    return client.post(f"/listings/{LISTING}/production-seats", data=data, content_type="multipart/form-data")


def _root(st: Store) -> Any:
    return drm.cert_from_bytes(st.ctx.root_cert_pem())


def _new_license_ids(st: Store, before: set[str]) -> list[str]:
    items = st.client.get("/api/v1/licenses", headers=st.auth("bill")).json["items"]
    return sorted({x["license_id"] for x in items} - before)


def _held_ids(st: Store) -> set[str]:
    return {x["license_id"] for x in st.client.get("/api/v1/licenses", headers=st.auth("bill")).json["items"]}


def test_builder_buys_fleet_seats_after_seeing_the_price(shop: Store) -> None:
    client, csrf = _login(shop, "bill")
    page = client.get(f"/listings/{LISTING}").get_data(as_text=True)
    assert "Buy production seats" in page and "Seats cost 2.50 each" in page
    pem, kid = _fleet_key()
    before, held = _licenses(shop), _held_ids(shop)

    r = _order(client, csrf, "review", mode="fleet", fleet_key=pem, seats="40")
    assert r.status_code == 200
    text = r.get_data(as_text=True)
    assert "40</span> seat(s) × 2.50" in text and "<strong data-order-total>100.00</strong>" in text
    assert "Confirm purchase" in text
    assert _licenses(shop) == before  # reviewing buys nothing

    # "Change order" brings the filled-in form back; confirming issues one fleet license for 40 seats.
    r = _order(client, csrf, "edit", mode="fleet", fleet_key=pem, seats="40")
    assert r.status_code == 200 and "Review order" in r.get_data(as_text=True)
    assert "-----BEGIN PUBLIC KEY-----" in r.get_data(as_text=True)
    r = _order(client, csrf, "confirm", mode="fleet", fleet_key=pem, seats="40")
    assert r.status_code == 302 and r.headers["Location"].endswith("/me/licenses#production")
    assert _licenses(shop) == before + 1
    (license_id,) = _new_license_ids(shop, held)

    page = client.get("/me/licenses").get_data(as_text=True)
    assert "1 production license(s) for fleet-digits (onnx-fp32), 40 seat(s)" in page
    row = re.search(rf'<tr data-license="{license_id}">(.+?)</tr>', page, re.S)
    assert row is not None
    assert f"fleet key <code>{kid}</code>" in row.group(1) and "<td>40</td>" in row.group(1)
    assert LISTING in row.group(1) and TARGET in row.group(1) and "valid" in row.group(1)

    token = client.get(f"/me/licenses/{license_id}.lic")
    assert token.status_code == 200
    assert f"filename={license_id}.lic" in token.headers["Content-Disposition"]
    api = shop.client.get(f"/api/v1/licenses/{license_id}", headers=shop.auth("bill")).json
    assert token.data == api["license"].encode()
    claims = drm.verify_license(
        token.data, root=_root(shop), now=int(time.time()), fleet_key_ids=frozenset({kid})
    ).claims
    assert claims.kind == "production" and claims.listing == LISTING and claims.fleet_key_id == kid
    # The sealed-build link on the page is the API download, which the session cookie may read.
    build = client.get(api["build_url"])
    assert build.status_code == 200 and build.headers["X-Build-Hash"] == api["build_hash"]


def test_builder_buys_one_license_per_device_certificate_from_a_file(shop: Store) -> None:
    client, csrf = _login(shop, "bill")
    certs = [_device_cert() for _ in range(3)]
    bundle = "\n".join(pem for pem, _ in certs).encode()
    before, held = _licenses(shop), _held_ids(shop)

    r = _order(client, csrf, "review", mode="devices", device_certs_file=(io.BytesIO(bundle), "fleet.pem"))
    text = r.get_data(as_text=True)
    assert r.status_code == 200 and "<strong data-order-total>7.50</strong>" in text
    assert "3 certificates" in text
    # The confirmation form carries the uploaded file's PEM blocks as text.
    carried = re.search(r'<textarea name="device_certs" hidden>(.*?)</textarea>', text, re.S)
    assert carried is not None and carried.group(1).count("BEGIN CERTIFICATE") == 3
    r = _order(client, csrf, "confirm", mode="devices", device_certs=bundle.decode())
    assert r.status_code == 302
    assert _licenses(shop) == before + 3
    page = client.get("/me/licenses").get_data(as_text=True)
    for _, device_id in certs:
        assert f"device <code>{device_id}</code>" in page
    bound = {}
    for license_id in _new_license_ids(shop, held):
        device_id = shop.client.get(f"/api/v1/licenses/{license_id}", headers=shop.auth("bill")).json[
            "device_id"
        ]
        token = client.get(f"/me/licenses/{license_id}.lic").data
        drm.verify_license(token, root=_root(shop), now=int(time.time()), device_id=device_id)
        bound[device_id] = license_id
    assert sorted(bound) == sorted(device_id for _, device_id in certs)


def _ed25519_pem() -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mode": "fleet", "fleet_key": "not a key", "seats": "5"}, "fleet_key is not a PEM public key"),
        ({"mode": "fleet", "fleet_key": "ED25519", "seats": "5"}, "fleet_key must be an X25519 public key"),
        ({"mode": "fleet", "fleet_key": "X25519", "seats": "0"}, "seats must be an integer between"),
        ({"mode": "fleet", "fleet_key": "X25519", "seats": "many"}, "seats must be an integer between"),
        ({"mode": "devices", "device_certs": "garbage"}, "device_certs:"),
        ({"mode": "devices", "device_certs": "SAME TWICE"}, "listed twice"),
        ({"mode": "devices", "device_certs": ""}, "device_certs must be a list of 1 to 1000"),
        (
            {
                "mode": "devices",
                "device_certs": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----",
            },
            "device_certs:",
        ),
    ],
    ids=[
        "not-pem",
        "ed25519-key",
        "zero-seats",
        "seats-not-a-number",
        "cert-garbage",
        "cert-twice",
        "no-certs",
        "cert-bad-der",
    ],
)
def test_bad_orders_are_shown_on_the_page_and_create_nothing(
    shop: Store, fields: dict[str, str], message: str
) -> None:
    client, csrf = _login(shop, "bill")
    if fields.get("fleet_key") == "ED25519":
        fields = {**fields, "fleet_key": _ed25519_pem()}
    elif fields.get("fleet_key") == "X25519":
        fields = {**fields, "fleet_key": _fleet_key()[0]}
    elif fields.get("device_certs") == "SAME TWICE":
        pem = _device_cert()[0]
        fields = {**fields, "device_certs": pem + "\n" + pem}
    before = shop.counts()
    r = _order(client, csrf, "confirm", **fields)
    assert r.status_code == 400, r.get_data(as_text=True)[-2000:]
    alert = re.search(r'<p class="error" role="alert">(.*?)</p>', r.get_data(as_text=True), re.S)
    assert alert is not None and message in alert.group(1).replace("&#39;", "'")
    assert "Review order" in r.get_data(as_text=True)  # the form is back, filled in, to correct
    assert shop.counts() == before
    assert client.get("/me/licenses").status_code == 200  # nothing half-issued is left behind


def test_review_without_a_seat_count_is_refused_on_the_page(shop: Store) -> None:
    client, csrf = _login(shop, "bill")
    r = _order(client, csrf, "review", mode="fleet", fleet_key=_fleet_key()[0], seats="-3")
    assert r.status_code == 400 and "seats must be a whole number" in r.get_data(as_text=True)
    r = _order(client, csrf, "review", mode="fleet", fleet_key=_fleet_key()[0], seats="20000000")
    assert r.status_code == 400 and "between 1 and 10000000" in r.get_data(as_text=True)
    r = _order(client, csrf, "review", mode="devices", device_certs=" ")
    assert r.status_code == 400 and "at least one device certificate" in r.get_data(as_text=True)


def test_review_checks_the_fleet_key_before_showing_a_price(shop: Store) -> None:
    client, csrf = _login(shop, "bill")
    for bad, words in (
        ("not a key", "fleet_key is not a PEM public key"),
        (drm.cert_to_pem(drm.DeviceKeys.generate().self_signed_cert(now=0)).decode(), "not a PEM public key"),
    ):
        r = _order(client, csrf, "review", mode="fleet", fleet_key=bad, seats="3")
        text = r.get_data(as_text=True)
        assert r.status_code == 400 and words in text, text[-2000:]
        assert "Confirm purchase" not in text  # no price, nothing to confirm
    r = _order(client, csrf, "review", mode="fleet", fleet_key=_fleet_key()[0], seats="3")
    assert r.status_code == 200 and "Confirm purchase" in r.get_data(as_text=True)


def test_unknown_target_and_oversized_orders_are_refused_without_a_500(shop: Store) -> None:
    client, csrf = _login(shop, "bill")
    before = shop.counts()
    r = client.post(
        f"/listings/{LISTING}/production-seats",
        data={
            "csrf_token": csrf,
            "step": "confirm",
            "target": "arm-cpu",
            "mode": "fleet",
            "fleet_key": _fleet_key()[0],
            "seats": "2",
        },
    )
    assert r.status_code == 404 and "has no arm-cpu build" in r.get_data(as_text=True)
    # More certificates than a request may carry (the API's JSON limit): 413, readable, nothing created.
    pem = _device_cert()[0]
    r = _order(
        client, csrf, "confirm", mode="devices", device_certs=(io.BytesIO(pem.encode() * 200), "x.pem")
    )
    assert r.status_code == 413 and "too large" in r.get_data(as_text=True)
    assert shop.counts() == before


def test_orders_need_the_csrf_token(shop: Store) -> None:
    client, _ = _login(shop, "bill")
    before = _licenses(shop)
    r = _order(client, None, "confirm", mode="fleet", fleet_key=_fleet_key()[0], seats="3")
    assert r.status_code == 403 and "did not come from this site" in r.get_data(as_text=True)
    r = _order(client, "forged-token", "confirm", mode="fleet", fleet_key=_fleet_key()[0], seats="3")
    assert r.status_code == 403
    assert _licenses(shop) == before


@pytest.mark.parametrize("who", ["bob", "sally"])
def test_buyers_and_sellers_neither_see_nor_post_the_seat_form(shop: Store, who: str) -> None:
    client, csrf = _login(shop, who)
    page = client.get(f"/listings/{LISTING}").get_data(as_text=True)
    assert "Fleet digits" in page and "Buy production seats" not in page
    before = _licenses(shop)
    for step in ("review", "confirm"):
        r = _order(client, csrf, step, mode="fleet", fleet_key=_fleet_key()[0], seats="3")
        assert r.status_code == 403
    assert _licenses(shop) == before
    anon = shop.app.test_client()
    assert "Buy production seats" not in anon.get(f"/listings/{LISTING}").get_data(as_text=True)


def _buy_fleet(st: Store, seats: int = 2) -> tuple[str, str]:
    client, csrf = _login(st, "bill")
    pem, kid = _fleet_key()
    held = _held_ids(st)
    r = _order(client, csrf, "confirm", mode="fleet", fleet_key=pem, seats=str(seats))
    assert r.status_code == 302
    (license_id,) = _new_license_ids(st, held)
    return license_id, kid


def test_only_the_holder_downloads_a_token(shop: Store) -> None:
    license_id, _ = _buy_fleet(shop)
    for who in ("bert", "sally", "bob"):
        client, _ = _login(shop, who)
        assert client.get(f"/me/licenses/{license_id}.lic").status_code == 404
        assert client.get(f"/me/licenses/bundle-inputs.zip?license={license_id}").status_code == 404
        assert license_id not in client.get("/me/licenses").get_data(as_text=True)
    # As in the API: another builder gets 404 there too, and the seller sees the license without its token.
    assert shop.client.get(f"/api/v1/licenses/{license_id}", headers=shop.auth("bert")).status_code == 404
    assert "license" not in shop.client.get(f"/api/v1/licenses/{license_id}", headers=shop.auth("sally")).json
    anon = shop.app.test_client().get(f"/me/licenses/{license_id}.lic")
    assert anon.status_code == 302 and "/login" in anon.headers["Location"]
    bill, _ = _login(shop, "bill")
    assert bill.get("/me/licenses/lic_doesnotexist.lic").status_code == 404
    assert bill.get("/me/licenses/bundle-inputs.zip").status_code == 400


def test_bundle_inputs_zip_builds_a_verified_bundle(shop: Store, tmp_path: Path) -> None:
    fleet_id, kid = _buy_fleet(shop, seats=7)
    device_pem, device_id = _device_cert()
    client, csrf = _login(shop, "bill")
    held = _held_ids(shop)
    assert _order(client, csrf, "confirm", mode="devices", device_certs=device_pem).status_code == 302
    (device_license,) = _new_license_ids(shop, held)

    page = client.get("/me/licenses").get_data(as_text=True)
    assert 'action="/me/licenses/bundle-inputs.zip"' in page and "/api/v1/root.crt" in page
    r = client.get(f"/me/licenses/bundle-inputs.zip?license={fleet_id}&license={device_license}")
    assert r.status_code == 200 and r.mimetype == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.data)) as zf:
        names = sorted(zf.namelist())
        zf.extractall(tmp_path / "in")
    build_hex = shop.client.get(f"/api/v1/licenses/{fleet_id}", headers=shop.auth("bill")).json["build_hash"][
        7:
    ]
    assert names == sorted(
        [
            "README.txt",
            "root.crt",
            "cards/",
            f"cards/{LISTING}.md",
            f"licenses/{fleet_id}.lic",
            f"licenses/{device_license}.lic",
            f"builds/{build_hex}.emdl",
        ]
    )
    src = tmp_path / "in"
    assert (src / "root.crt").read_bytes() == shop.client.get("/api/v1/root.crt").data

    # Exactly the inputs `edgemart bundle build` takes, as the README in the ZIP says.
    key = tmp_path / "builder.pem"
    assert edgemart_main(["bundle", "keygen", "--out", str(key)]) == 0
    out = tmp_path / "fleet.tar.gz"
    build_cmd = re.search(r"edgemart (bundle build .+?--out \S+)", (src / "README.txt").read_text(), re.S)
    assert build_cmd is not None
    args = build_cmd.group(1).replace("\\\n", " ").split()
    args = [str(src / a) if a in ("licenses", "builds", "cards", "root.crt") else a for a in args]
    args = [str(key) if a == "builder.pem" else str(out) if a == "fleet.tar.gz" else a for a in args]
    assert edgemart_main(args) == 0
    assert (
        edgemart_main(
            [
                "bundle",
                "verify",
                str(out),
                "--root",
                str(src / "root.crt"),
                "--builder-key",
                str(tmp_path / "builder.pub.pem"),
            ]
        )
        == 0
    )
    from edge_runtime.bundle import verify_bundle

    verified = verify_bundle(out.read_bytes(), now=int(time.time()), root=_root(shop)).report()
    bindings = {(x["binding"]["kind"], x["binding"]["id"]) for x in verified["licenses"]}
    assert bindings == {("fleet", kid), ("device", device_id)}


def test_revoked_licenses_stay_out_of_the_bundle_inputs(shop: Store) -> None:
    license_id, _ = _buy_fleet(shop)
    r = shop.client.post(f"/api/v1/licenses/{license_id}/revoke", headers=shop.auth("ada"))
    assert r.status_code == 200
    client, _ = _login(shop, "bill")
    row = re.search(
        rf'<tr data-license="{license_id}">(.+?)</tr>',
        client.get("/me/licenses").get_data(as_text=True),
        re.S,
    )
    assert row is not None and "revoked" in row.group(1) and "disabled" in row.group(1)
    assert "sealed build" not in row.group(1)
    r = client.get(f"/me/licenses/bundle-inputs.zip?license={license_id}")
    assert r.status_code == 409 and "is revoked" in r.get_data(as_text=True)
    assert client.get(f"/me/licenses/{license_id}.lic").status_code == 200  # the API hands it out too
