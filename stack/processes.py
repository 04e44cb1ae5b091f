"""Child processes that die with loadlab: own process group, parent-death signal, terminate-then-kill on stop."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: a new process group (so Ctrl-C reaches loadlab only, which then
    # stops children in order) and SIGTERM when loadlab dies, even by SIGKILL, so nothing is orphaned.
    os.setpgrp()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class Child:
    name: str
    command: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    stop_signal: int = signal.SIGTERM
    popen: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> "Child":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab", buffering=0)
        try:
            self.popen = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=self.env, preexec_fn=_die_with_parent, close_fds=True)
        finally:
            log.close()
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Polite signal to the leader, then SIGKILL to the whole group (pool children included)."""
        stop_together([(self, timeout)])

    def _signal_stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            try:
                self.popen.send_signal(self.stop_signal)
            except ProcessLookupError:
                pass

    def _kill_group(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        if self.popen is not None:
            self._kill_group()


def stop_together(children: list[tuple[Child, float]]) -> None:
    """Stops children at once: each gets its polite signal, then up to its own timeout to exit, then SIGKILL to its
    group. A worker's warm shutdown and the exporter's take ~2 s each; side by side they take the longer of the two."""
    started = [(child, time.monotonic() + timeout) for child, timeout in children if child.popen is not None]
    for child, _deadline in started:
        child._signal_stop()
    for child, deadline in started:
        while child.popen.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        child._kill_group()
