"""Moved to edgemart.core.safe_yaml; this name stays for code written against the old layout (nothing in this tree uses it)."""

from edgemart.core.safe_yaml import *  # noqa: F403
