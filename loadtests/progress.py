"""Progress of a headless run for a log (stdout not a terminal, as in CI): a plain line every few seconds, where a
terminal gets Rich's live bar (which, without a terminal, prints once at the end and nothing before)."""
from __future__ import annotations

import time


class ProgressLines:
    def __init__(self, console, interval_s: float):
        self.console = console
        self.interval_s = interval_s
        self.enabled = not console.is_terminal
        self._last_at: float | None = None
        self._last_done = 0
        self._started = time.monotonic()

    def line(self, phase: str, sent: int, done: int, in_flight: int, *, force: bool = False) -> None:
        """Prints ``phase 12s: 120 sent, 110 done, 10 in flight, 9.8 done/s`` when the interval has passed."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and self._last_at is not None and now - self._last_at < self.interval_s:
            return
        elapsed = now - (self._last_at if self._last_at is not None else self._started)
        rate = (done - self._last_done) / elapsed if elapsed > 0 else 0.0
        self._last_at, self._last_done = now, done
        self.console.print(f"{phase} {now - self._started:.0f}s: {sent} sent, {done} done, {in_flight} in flight, "
                           f"{rate:.1f} done/s", highlight=False, markup=False)
