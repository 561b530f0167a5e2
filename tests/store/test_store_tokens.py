"""API token theft: a dump of everything the store keeps yields no usable token, a revoked token is
refused at once (the holder's other tokens keep working), a token never carries more than the role it
was issued for, and forged or malformed tokens are one clean 401, never a 500."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import select

from edgemart.core.errors import NotFoundError
from store.models import ApiToken
from store.services import accounts


def _me(store, token: str):
    return store.client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})


def _row(store, token: str) -> ApiToken:
    with store.ctx.Session() as s:
        row = s.scalar(select(ApiToken).where(ApiToken.token_hash == accounts.token_hash(token)))
        assert row is not None
        s.expunge(row)
        return row


def test_a_dump_of_the_data_dir_yields_no_usable_token(store) -> None:
    """Every file the store wrote (database and its WAL, keys, blobs) holds only SHA-256 hashes and a
    display prefix; neither works as a bearer token."""
    tokens = list(store.tokens.values())
    assert len(set(tokens)) == len(tokens)
    dump = b"".join(p.read_bytes() for p in sorted(store.data_dir.rglob("*")) if p.is_file())
    for token in tokens:
        secret = token[len(accounts.TOKEN_PREFIX) :]
        assert secret.encode() not in dump
        assert secret[-16:].encode() not in dump  # not even a tail of the secret part
    with store.ctx.Session() as s:
        rows = s.scalars(select(ApiToken)).all()
        stored = {(r.token_hash, r.prefix) for r in rows}
    assert stored == {(hashlib.sha256(t.encode()).hexdigest(), t[:10]) for t in tokens}
    for token_hash, prefix in stored:
        for candidate in (token_hash, prefix, accounts.TOKEN_PREFIX + token_hash):
            r = _me(store, candidate)
            assert r.status_code == 401 and r.json["error"]["code"] == "unauthorized"


def test_no_response_carries_a_token(store) -> None:
    """A token is shown once, at creation (CLI); no API response repeats it."""
    for who in store.tokens:
        for path in ("/api/v1/me", "/api/v1/licenses", "/api/v1/devices", "/openapi.json"):
            body = store.client.get(path, headers=store.auth(who)).data
            assert not any(t.encode() in body for t in store.tokens.values()), (who, path)


def test_a_revoked_token_is_refused_at_once(store) -> None:
    with store.ctx.Session() as s:
        bob = accounts.get_user(s, "bob")
        spare = accounts.issue_token(s, bob, now=store.ctx.now())
        s.commit()
    assert _me(store, spare).status_code == 200
    row = _row(store, spare)

    with store.ctx.Session() as s:
        # Someone else's token id is not found, not revoked: ids do not leak across users.
        with pytest.raises(NotFoundError):
            accounts.revoke_token(s, accounts.get_user(s, "sally"), row.id, now=store.ctx.now())
        accounts.revoke_token(s, accounts.get_user(s, "bob"), row.id, now=store.ctx.now())
        s.commit()
    revoked_at = _row(store, spare).revoked_at
    assert revoked_at is not None

    r = _me(store, spare)
    assert r.status_code == 401 and r.json["error"]["code"] == "unauthorized"
    r = store.client.post(
        "/api/v1/devices/enroll", json={"csr": "x"}, headers={"Authorization": f"Bearer {spare}"}
    )
    assert r.status_code == 401  # writes too, before the body is even looked at
    assert store.client.get("/api/v1/me", headers=store.auth("bob")).json["name"] == "bob"

    with store.ctx.Session() as s:  # revoking again keeps the first revocation time
        accounts.revoke_token(s, accounts.get_user(s, "bob"), row.id, now=store.ctx.now() + 100)
        s.commit()
    assert _row(store, spare).revoked_at == revoked_at


def _set_role(store, name: str, role: str) -> None:
    with store.ctx.Session() as s:
        accounts.get_user(s, name).role = role
        s.commit()


def test_a_token_never_exceeds_the_role_it_was_issued_for(store) -> None:
    """Tokens are scoped to the role at issue time: promoting a user does not turn their old (maybe
    stolen) token into an admin token, and a demoted seller's old token cannot upload."""
    admin_only = "/api/v1/listings?status=blocked"
    assert store.client.get(admin_only, headers=store.auth("bob")).status_code == 403

    _set_role(store, "bob", "admin")
    for path in (admin_only, "/api/v1/me"):
        r = store.client.get(path, headers=store.auth("bob"))
        assert r.status_code == 403 and "issued for another role" in r.json["error"]["message"]
    with store.ctx.Session() as s:
        fresh = accounts.issue_token(s, accounts.get_user(s, "bob"), now=store.ctx.now())
        s.commit()
    assert _row(store, fresh).role == "admin"
    assert store.client.get(admin_only, headers={"Authorization": f"Bearer {fresh}"}).status_code == 200

    _set_role(store, "sally", "buyer")
    r = store.client.post("/api/v1/listings", data={}, headers=store.auth("sally"))
    assert r.status_code == 403 and "issued for another role" in r.json["error"]["message"]


@pytest.mark.parametrize(
    "header",
    [
        "Bearer ",
        "Bearer emt_",
        "Bearer emt_" + "A" * 43,  # the right shape, never issued
        "Bearer emt_" + "A" * 300,  # longer than any token
        "Bearer emt_\u00e9\u00e9",
        "Bearer " + "\u00ff" * 50,
        "Token {bob}",
        "Basic {bob}",
        "Bearer {bob}x",
        "Bearer {bob_flipped}",
        "{bob}",
    ],
)
def test_forged_and_malformed_tokens_are_a_clean_401(store, header: str) -> None:
    bob = store.tokens["bob"]
    flipped = bob[:-1] + ("A" if bob[-1] != "A" else "B")
    value = header.format(bob=bob, bob_flipped=flipped)
    for method, path in (("GET", "/api/v1/me"), ("POST", "/api/v1/devices/enroll")):
        r = store.client.open(path, method=method, headers={"Authorization": value}, json={})
        assert r.status_code == 401, (value, r.data[:200])
        assert r.json["error"]["code"] == "unauthorized"
    assert store.client.get("/api/v1/me", headers=store.auth("bob")).status_code == 200


def test_tokens_api_create_list_revoke(store) -> None:
    """A user mints a second token, sees both by prefix only, revokes the first; an admin can revoke anyone's
    (a stolen token), another user cannot even see it exists."""
    r = store.client.post("/api/v1/tokens", headers=store.auth("bob"))
    assert r.status_code == 201 and r.json["token"].startswith("emt_")
    new_token = r.json["token"]
    listed = store.client.get("/api/v1/tokens", headers={"Authorization": f"Bearer {new_token}"}).json[
        "items"
    ]
    assert len(listed) == 2 and all("token" not in t and "token_hash" not in t for t in listed)
    assert new_token not in str(listed) and {t["role"] for t in listed} == {"buyer"}
    first = listed[0]["id"]
    assert store.client.post(f"/api/v1/tokens/{first}/revoke", headers=store.auth("betty")).status_code == 404
    r = store.client.post(f"/api/v1/tokens/{first}/revoke", headers={"Authorization": f"Bearer {new_token}"})
    assert r.status_code == 200 and r.json["revoked_at"] is not None
    assert store.client.get("/api/v1/me", headers=store.auth("bob")).status_code == 401  # the old one is dead
    second = listed[1]["id"]
    r = store.client.post(f"/api/v1/tokens/{second}/revoke", headers=store.auth("ada"))
    assert r.status_code == 200
    assert store.client.get("/api/v1/me", headers={"Authorization": f"Bearer {new_token}"}).status_code == 401
    assert store.client.post("/api/v1/tokens/99999/revoke", headers=store.auth("ada")).status_code == 404


def test_operator_revokes_a_users_tokens_from_the_cli(store, tmp_path) -> None:
    import json
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edgemart", "store", "tokens", *args, "--data-dir", str(store.data_dir)],
            env={**os.environ, "PYTHONPATH": str(root)},
            capture_output=True,
            text=True,
            timeout=120,
        )

    text = cli("sam").stdout  # times in ISO-8601 UTC, not raw Unix seconds
    assert re.search(r"created \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ  last used never", text), text
    listed = json.loads(cli("sam", "--json").stdout)
    assert [t["revoked_at"] for t in listed["tokens"]] == [None]
    done = cli("sam", "--revoke-all", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["revoked"] == [listed["tokens"][0]["id"]]
    assert store.client.get("/api/v1/me", headers=store.auth("sam")).status_code == 401
    missing = cli("nobody")
    assert (
        missing.returncode == 2 and "no user 'nobody'" in missing.stderr and "Traceback" not in missing.stderr
    )
    other = cli("sam", "--revoke", "1")  # token 1 is sally's, not sam's
    assert other.returncode == 2 and "has no token 1" in other.stderr
