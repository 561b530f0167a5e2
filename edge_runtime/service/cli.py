"""`edgemart device serve` and `edgemart device install-service`: registered into the `device` group by
edge_runtime.cli; the handlers import the service modules."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgemart.core.output import emit


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the device service: this account alone owns the device dir; group members use the socket",
        description="Run the device service (normally as the account install-service made, from its systemd"
        " unit). It alone reads the device dir, keys, sealed state, anchor and decrypted models; members of"
        " --group enroll, fetch, eval and run chains through --socket. No call returns model bytes or keys.",
    )
    p.add_argument(
        "--device-dir", required=True, type=Path, help="the device directory (0700, this account's)"
    )
    p.add_argument("--socket", type=Path, default=None, help="unix socket path (default: the standard one)")
    p.add_argument(
        "--group", default=None, help="group whose members may use the service (default: edgemart)"
    )
    p.add_argument(
        "--anchor-dir", type=Path, help="where the rollback anchor file lives (outside the device dir)"
    )
    p.set_defaults(func=_serve)

    p = sub.add_parser(
        "install-service",
        help="as root: create the service account and group, its 0700 state dir and the systemd unit",
        description="Create the device service's system account (useradd --system), the group whose members"
        " may use it, the 0700 state directory the account owns (device dir, anchors) and a systemd unit"
        " file. The unit is written, not started: systemctl daemon-reload && systemctl enable --now it.",
    )
    p.add_argument("--user", default=None, help="the service account (default: edgemart-device)")
    p.add_argument("--group", default=None, help="the group of users allowed to use it (default: edgemart)")
    p.add_argument("--state-dir", type=Path, default=Path("/var/lib/edgemart-device"))
    p.add_argument("--socket", type=Path, default=None, help="unix socket path (default: the standard one)")
    p.add_argument("--unit-dir", type=Path, default=Path("/etc/systemd/system"))
    p.add_argument("--python", help="the interpreter the unit runs (default: this one)")
    p.add_argument("--pythonpath", help="PYTHONPATH for the unit, when edgemart is not installed for it")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_install_service)


def _serve(args: argparse.Namespace) -> int:
    from edge_runtime.service import DEFAULT_GROUP, DEFAULT_SOCKET
    from edge_runtime.service.server import serve

    serve(
        args.device_dir,
        args.socket or Path(DEFAULT_SOCKET),
        args.group or DEFAULT_GROUP,
        anchor_dir=args.anchor_dir,
    )
    return 0


def _install_service(args: argparse.Namespace) -> int:
    from edge_runtime.service import DEFAULT_GROUP, DEFAULT_SOCKET, DEFAULT_USER
    from edge_runtime.service.install import install_service

    result = install_service(
        user=args.user or DEFAULT_USER,
        group=args.group or DEFAULT_GROUP,
        state_dir=args.state_dir,
        socket_path=args.socket or Path(DEFAULT_SOCKET),
        unit_dir=args.unit_dir,
        python=args.python,
        pythonpath=args.pythonpath,
    )
    emit(
        args,
        result,
        f"service account {result['user']} (uid {result['uid']}) owns {result['state_dir']} (0700);"
        f" members of group {result['group']} may use {result['socket']}\nunit written to {result['unit']}"
        f" (not started): systemctl daemon-reload && systemctl enable --now edgemart-device"
        f"\nadd a user to the group: usermod -a -G {result['group']} USER",
    )
    return 0
