"""Moved to edgemart.core.fileio; this name stays for code written against the old layout (nothing in this tree uses it)."""

from edgemart.core.fileio import *  # noqa: F403
