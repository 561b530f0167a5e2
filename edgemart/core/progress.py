"""The one progress line every CLI command draws on stderr: redrawn in place on a terminal, a handful of
plain lines when stderr is a file or a pipe, and wiped before an error line is written (`clear_all`)."""

from __future__ import annotations

import sys
from typing import Any

_ACTIVE: list[LineProgress] = []


class LineProgress:
    """``update(fraction, text)`` as work goes on; ``close()`` keeps the last line, ``clear()`` erases it."""

    def __init__(self, stream: Any = None, *, steps: int = 4, width: int = 100) -> None:
        self.stream = stream or sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty()) if callable(isatty) else False
        self.steps = steps  # lines written when not a terminal: at 0 %, then every 1/steps
        self.width = width
        self._step = -1
        self._drawn = 0
        self._last = ""

    def update(self, fraction: float, text: str) -> None:
        line = text[: self.width]
        if self.tty:
            if line == self._last:
                return
            self.stream.write("\r" + line.ljust(self._drawn))
            self._drawn, self._last = len(line), line
            if self not in _ACTIVE:
                _ACTIVE.append(self)
        else:
            step = int(max(0.0, min(1.0, fraction)) * self.steps)
            if step <= self._step:
                return
            self._step = step
            self.stream.write(line + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Erase the line (before an error or the final report is written)."""
        if self.tty and self._drawn:
            self.stream.write("\r" + " " * self._drawn + "\r")
            self.stream.flush()
        self._drawn, self._last = 0, ""
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    def close(self) -> None:
        """Leave the last line on screen and move below it."""
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        self._drawn, self._last = 0, ""
        if self in _ACTIVE:
            _ACTIVE.remove(self)


def clear_all() -> None:
    """Wipe every progress line still drawn, so that an error line starts at column 0 on a clean line."""
    for bar in list(_ACTIVE):
        bar.clear()


def bar(fraction: float, width: int = 24) -> str:
    """``[#####.......]`` for a fraction in [0, 1]."""
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"
