"""The edgemart web store: accounts, listings, uploads, packaging jobs, licenses, usage, web UI.

Import is lazy on purpose: ``store.keyvault``, ``store.client`` and ``store.cli`` must not pull in Flask."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """The Flask application (see ``store.app.create_app`` for the config keys)."""
    from store.app import create_app as _create_app

    return _create_app(config)


__all__ = ["create_app"]
