"""Command output shared by every CLI group: one JSON object with --json, else human text; times as ISO-8601."""

from __future__ import annotations

import argparse
import json
from typing import Any


def emit(args: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    """A command's result: one JSON object on stdout with --json, else the human text. Every CLI group uses it."""
    if getattr(args, "json", False):
        print(json.dumps(obj, sort_keys=True, default=str))
    else:
        print(text.rstrip("\n"))


def iso_utc(t: int | None) -> str:
    """Unix seconds as ISO-8601 UTC (``2026-12-02T06:25:00Z``) for command output; "never" for none."""
    import time

    return "never" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(t)))
