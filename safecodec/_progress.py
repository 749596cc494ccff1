"""The one progress bar: tqdm when it is installed and asked for, otherwise nothing.

Every long operation that reports progress (remote reads and writes, sharded saves, the
CLI's verify and rewrite commands) uses :class:`ProgressBar`, so a user who installs the
``progress`` extra gets the same bars everywhere, and one who does not gets silence.
"""

from __future__ import annotations

import _thread
from typing import Any

__all__ = ["ProgressBar"]


class ProgressBar:
    """A progress bar counting ``unit`` (bytes by default): tqdm when it is installed and
    ``enabled``, else a no-op. ``update`` is thread-safe.

    Args:
        total: The amount expected (0 or None: unknown).
        desc: The label shown before the bar.
        enabled: Whether to show anything at all.
        unit: ``"B"`` (bytes, scaled to KiB/MiB...) or another unit name (``"tensor"``).
        file: Where tqdm writes (default: stderr).
    """

    def __init__(self, total: int | None, desc: str, enabled: bool, *, unit: str = "B",
                 file: Any = None) -> None:
        self._bar: Any = None
        self._lock = _thread.allocate_lock()
        #: The amount counted so far (also without a bar).
        self.done = 0
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:  # optional: no bar without tqdm
            return
        scaled = unit == "B"
        self._bar = tqdm(total=total or None, desc=desc, unit=unit, unit_scale=scaled,
                         unit_divisor=1024 if scaled else 1000, leave=False, file=file)

    @property
    def shown(self) -> bool:
        """Whether a bar is drawn (tqdm installed and enabled)."""
        return self._bar is not None

    def describe(self, text: str) -> None:
        """Replace the label (long jobs name the step they are in)."""
        if self._bar is not None:
            with self._lock:
                self._bar.set_description(text)

    def update(self, n: int) -> None:
        """Advance by ``n``."""
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(n)

    def close(self) -> None:
        """Remove the bar (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
