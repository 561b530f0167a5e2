"""`edgemart device install-service`: the service account (useradd --system), the group whose members may
use the service, the 0700 state directory owned by the account, and the systemd unit (written, not started)."""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgemart.core import fileio
from edgemart.core.errors import UsageError

UNIT_NAME = "edgemart-device.service"


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        problem = (done.stderr or done.stdout).strip().splitlines()
        raise UsageError(f"{' '.join(argv[:2])} failed: {problem[-1] if problem else done.returncode}")


def unit_text(
    *, user: str, group: str, state_dir: Path, socket_path: Path, python: str, pythonpath: str | None
) -> str:
    serve = [
        python, "-m", "edgemart", "device", "serve",
        "--device-dir", str(state_dir / "device"), "--anchor-dir", str(state_dir / "anchors"),
        "--socket", str(socket_path), "--group", group,
    ]  # fmt: skip
    env = f"Environment={shlex.quote('PYTHONPATH=' + pythonpath)}\n" if pythonpath else ""
    return f"""[Unit]
Description=edgemart device service (owns the device keys, sealed state and decrypted models)
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={user}
Group={user}
SupplementaryGroups={group}
UMask=0077
RuntimeDirectory={socket_path.parent.name}
RuntimeDirectoryMode=0755
{env}ExecStart={shlex.join(serve)}
Restart=on-failure
# decrypted models live in this service's memory only: no core dumps, no new privileges, a read-only system
LimitCORE=0
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={state_dir}
ProtectHome=yes
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
LockPersonality=yes

[Install]
WantedBy=multi-user.target
"""


def install_service(
    *,
    user: str,
    group: str,
    state_dir: Path,
    socket_path: Path,
    unit_dir: Path,
    python: str | None = None,
    pythonpath: str | None = None,
    check: bool = True,
) -> dict[str, Any]:
    """Idempotent: an existing account or group is reused (and the account added to the group)."""
    if os.geteuid() != 0:
        raise UsageError("install-service creates a system account: run it as root")
    if not state_dir.is_absolute() or not socket_path.is_absolute():
        raise UsageError("--state-dir and --socket must be absolute paths")
    python = python or sys.executable
    created: list[str] = []
    try:
        grp.getgrnam(group)
    except KeyError:
        _run(["groupadd", "--system", group])
        created.append(f"group {group}")
    try:
        account = pwd.getpwnam(user)
        _run(["usermod", "--append", "--groups", group, user])
    except KeyError:
        _run(
            ["useradd", "--system", "--user-group", "--groups", group, "--home-dir", str(state_dir),
             "--no-create-home", "--shell", "/usr/sbin/nologin", user]
        )  # fmt: skip
        created.append(f"user {user}")
        account = pwd.getpwnam(user)
    for d in (state_dir, state_dir / "device", state_dir / "anchors"):
        d.mkdir(mode=fileio.PRIVATE_DIR, parents=True, exist_ok=True)
        os.chown(d, account.pw_uid, account.pw_gid)
        os.chmod(d, fileio.PRIVATE_DIR)
    unit_dir.mkdir(parents=True, exist_ok=True)
    unit = unit_dir / UNIT_NAME
    text = unit_text(
        user=user,
        group=group,
        state_dir=state_dir,
        socket_path=socket_path,
        python=python,
        pythonpath=pythonpath,
    )
    fileio.atomic_write(unit, text.encode(), mode=0o644)
    if check:  # the account must be able to start the interpreter and import the runtime
        env = ["env", f"PYTHONPATH={pythonpath}"] if pythonpath else []
        probe = subprocess.run(
            ["runuser", "-u", user, "--", *env, python, "-c", "import edge_runtime.service.server"],
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
        )
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["exit " + str(probe.returncode)])[-1]
            raise UsageError(
                f"account {user} cannot run {python} with the edgemart runtime ({last}):"
                " install edgemart[device] where the account can read it, or give --python / --pythonpath"
            )
    return {
        "user": user,
        "uid": account.pw_uid,
        "group": group,
        "state_dir": str(state_dir),
        "device_dir": str(state_dir / "device"),
        "socket": str(socket_path),
        "unit": str(unit),
        "created": created,
    }
