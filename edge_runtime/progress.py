"""Moved to edgemart.core.progress; this name stays for code written against the old layout (nothing in this tree uses it)."""

from edgemart.core.progress import *  # noqa: F403
