"""The web UI (blueprint ``web``): browse, listing pages, seller upload, buyer licenses, admin review."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, render_template

bp = Blueprint("web", __name__)


@bp.get("/")
def index() -> Any:
    return render_template("index.html", items=[], page=1, pages=1)
