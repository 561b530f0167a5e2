"""Looking for decrypted model bytes on disk: samples of the plaintext and a walk that reports every file
holding one (tests of "decrypted weights never touch disk")."""

from __future__ import annotations

import os
from pathlib import Path


def windows(plaintext: bytes, count: int = 12, size: int = 48) -> list[bytes]:
    """``count`` slices of ``size`` bytes spread over ``plaintext``."""
    step = max(1, (len(plaintext) - size) // count)
    return [plaintext[i : i + size] for i in range(step // 2, len(plaintext) - size, step)][:count]


def files_containing(root: Path, needles: list[bytes]) -> list[str]:
    """Every readable file under ``root`` that contains one of ``needles``."""
    hits = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if any(n in data for n in needles):
                hits.append(str(path))
    return hits
