"""A throw-away SoftHSM2 token store for the PKCS#11 key vault tests, made once per test process.

SoftHSM reads SOFTHSM2_CONF and lists its tokens only when the module is initialised (the first vault call),
so every token the tests use is created here, up front, and SOFTHSM2_CONF is set before anything loads it."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

MODULE = os.environ.get("EDGEMART_TEST_PKCS11_MODULE", "/usr/lib/softhsm/libsofthsm2.so")
TOKEN = "edgemart-test"
OTHER_TOKEN = "edgemart-other"  # a second token, hence a second KEK: "the disk copied to another HSM"
PIN = "1234"
SO_PIN = "5678"


@dataclass(frozen=True)
class SoftHsm:
    module: str
    conf: Path
    token: str = TOKEN
    other_token: str = OTHER_TOKEN
    pin: str = PIN

    def vault(self, directory: str | os.PathLike[str], *, token: str | None = None, **kw: Any) -> Any:
        from store.keyvault_pkcs11 import Pkcs11KeyVault

        return Pkcs11KeyVault(
            directory,
            module=self.module,
            token_label=token or self.token,
            pin=kw.pop("pin", self.pin),
            **kw,
        )

    def store_config(self) -> dict[str, str]:
        """The store settings selecting this token (create_app / EDGEMART_* environment)."""
        return {
            "KEY_VAULT": "pkcs11",
            "PKCS11_MODULE": self.module,
            "PKCS11_TOKEN": self.token,
            "PKCS11_PIN": self.pin,
        }

    @contextmanager
    def session(self, token: str | None = None) -> Iterator[Any]:
        """A session of our own on a token, to look at (or plant) objects as an attacker with the PIN would.

        PKCS#11 login is per process, so the process logs in the way the vaults do (their shared connection)
        and this extra session, opened after, is logged in too; closing it leaves that login alone."""
        from store import keyvault_pkcs11

        label = token or self.token
        with keyvault_pkcs11._lock:  # the module is not thread-safe; the vaults hold this lock for every call
            keyvault_pkcs11._connect(self.module, label, self.pin)
            session = keyvault_pkcs11._library(self.module).get_token(token_label=label).open(rw=True)
            try:
                yield session
            finally:
                session.close()


_instance: SoftHsm | None = None


def softhsm() -> SoftHsm:
    """The process's SoftHSM (two initialised tokens in a temp dir); skips when SoftHSM is not installed."""
    global _instance
    if _instance is not None:
        return _instance
    util = shutil.which("softhsm2-util")
    if util is None or not Path(MODULE).is_file():
        pytest.skip(f"SoftHSM2 not installed (softhsm2-util on PATH and {MODULE}; apt install softhsm2)")
    root = Path(tempfile.mkdtemp(prefix="edgemart-softhsm-"))
    atexit.register(shutil.rmtree, root, True)
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    os.environ["SOFTHSM2_CONF"] = str(conf)
    for label in (TOKEN, OTHER_TOKEN):
        subprocess.run(
            [util, "--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", SO_PIN],
            check=True,
            capture_output=True,
        )
    _instance = SoftHsm(MODULE, conf)
    return _instance
