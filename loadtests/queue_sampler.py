"""The broker's queue depth while load runs: one sampler for headless runs and the web UI's Celery tab.

The queue is polled at a fixed rate (one sample per one-second bucket of the report's time series) through the
exporter's probe (``BrokerPoller``: Redis ``LLEN`` of the list and its priority sub-lists, ``unacked`` too; other
transports a passive ``queue_declare``). Each sample goes to ``on_sample(epoch_seconds, depth)``, depth ``None`` when
the poll failed. The sampler runs in a thread of its own (a greenlet where Locust patched the process: redis-py and
amqp then use cooperative sockets), so a slow or dead broker never holds up the load: a failed poll is counted, the
connection dropped and the next round reconnects. ``stop()`` takes one last sample (the queue as the drain left it)
and returns within a bounded time (a poll is bounded by the broker's connect and socket timeouts)."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


@dataclass
class QueueDepthStats:
    """What one run (or one swarm of the web UI) saw of the queue: its report's ``queue_depth_sampling``."""
    samples: int = 0
    errors: int = 0
    peak: int | None = None
    last: int | None = None
    last_error: str | None = None

    def observe(self, depth: int | None, error: str | None = None) -> None:
        if depth is None:
            self.errors += 1
            self.last_error = error or self.last_error
            return
        self.samples += 1
        self.last = depth
        self.peak = depth if self.peak is None else max(self.peak, depth)

    def summary(self, sampler: "QueueSampler", source: str) -> dict:
        return {"queue": sampler.queue, "transport": sampler.transport, "source": source,
                "interval_s": sampler.interval_s, "statistic": "last", "samples": self.samples,
                "errors": self.errors, "peak": self.peak, "last": self.last, "last_error": self.last_error}


class QueueSampler:
    def __init__(self, app, queue: str, interval_s: float,
                 on_sample: Callable[[float, int | None], None] | None = None):
        from loadlab.exporters.exporter_service import BrokerPoller

        self.app = app
        self.queue = queue
        self.interval_s = interval_s
        self.on_sample = on_sample
        self.poller = BrokerPoller(app, [queue])
        try:
            with app.connection_for_read() as conn:  # names the transport; opens no socket
                self.transport = conn.transport.driver_type
        except Exception:  # noqa: BLE001 - a transport kombu cannot name: the samples still say what they saw
            self.transport = None
        # the latest poll, as the Celery tab shows it
        self.state: dict = {"depth": None, "unacked": None, "error": None, "at": None}
        self.polls = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int | None:
        at = time.time()
        try:
            polled = self.poller.poll()
        except Exception as exc:  # noqa: BLE001 - a broker restart (chaos) or outage: count it, try next round
            self.poller.reset()
            self.state = {**self.state, "error": one_line(exc), "at": at}
            self.polls += 1
            if self.on_sample is not None:
                self.on_sample(at, None)
            return None
        unacked = polled.get("unacked") or {}
        depth = int(polled["length"].get(self.queue, 0))
        self.state = {"depth": depth, "unacked": sum(unacked.values()) if unacked else None, "error": None, "at": at}
        self.polls += 1
        if self.on_sample is not None:
            self.on_sample(at, depth)
        return depth

    def start(self) -> "QueueSampler":
        self._thread = threading.Thread(target=self._loop, name="loadlab-queue-depth", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        next_at = time.monotonic()
        while True:
            self.sample()
            next_at += self.interval_s  # a fixed rate, not interval + poll time
            now = time.monotonic()
            if next_at < now:
                next_at = now
            if self._stop.wait(next_at - now):
                break
        self.sample()

    def wait_for_next_sample(self, timeout_s: float) -> bool:
        """Until the next poll has ended (True) or the timeout (False)."""
        polls, deadline = self.polls, time.monotonic() + timeout_s
        while self.polls == polls and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.polls > polls

    def stop(self, timeout_s: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None
        self.poller.reset()
