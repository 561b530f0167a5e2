"""Moved to edgemart.core.model_safety; this name stays for code written against the old layout (nothing in this tree uses it)."""

from edgemart.core.model_safety import *  # noqa: F403
