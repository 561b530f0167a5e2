"""Moved to edgemart.core.errors; this name stays for code written against the old layout (nothing in this tree uses it)."""

from edgemart.core.errors import *  # noqa: F403
