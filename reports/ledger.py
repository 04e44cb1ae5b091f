"""The ledger channel: producers and workers push one small record per event into a Redis list of the run;
the recorder (``reports.recorder``) pops them. Record layouts are defined here once.

Why a Redis list and not Celery events: it works whatever the broker is (RabbitMQ, SQL backends), costs one
RPUSH per event on loopback, keeps arrival order per producer, and survives distributed Locust workers: every
producer process, the producer API included, writes to the same list, so one recorder sees the whole run.
"""
from __future__ import annotations

import os
import threading

import msgpack

# Record kinds: the first element of every record.
SENT = "S"       # [SENT, task_id, task_name, sent_at, publish_seconds, intended_at]
ATTEMPT = "A"    # [ATTEMPT, task_id, task_name, state, sent_at, attempt_sent_at, eta, started_at, body_done_at,
                 #  finished_at, retries, exception_type, intended_at, hostname]
TERMINAL_STATES = ("SUCCESS", "FAILURE", "REVOKED", "REJECTED")

# Message header names carried from the first publish through every retry.
HEADER_SENT_AT = "loadlab_sent_at"
HEADER_ATTEMPT_SENT_AT = "loadlab_attempt_sent_at"
HEADER_INTENDED_AT = "loadlab_intended_at"


def channel_key(run_id: str) -> str:
    return f"loadlab:{run_id}:ledger"


class LedgerSink:
    """Pushes records to the run's ledger list. Connects lazily so that it is safe across fork."""

    def __init__(self, url: str, run_id: str):
        self.url = url
        self.key = channel_key(run_id)
        self._client = None
        self._pid = None
        self._lock = threading.Lock()

    def _redis(self):
        if self._client is None or self._pid != os.getpid():
            import redis

            self._client = redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)
            self._pid = os.getpid()
        return self._client

    def push(self, record: list) -> None:
        data = msgpack.packb(record, use_bin_type=True)
        try:
            self._redis().rpush(self.key, data)
        except Exception:  # noqa: BLE001 - the ledger must never break the task it observes
            self._client = None


def pop_batch(connect, key: str, batch: int) -> list[bytes] | None:
    """Up to ``batch`` records from the channel, oldest first; None when the ledger Redis cannot be reached (it is
    restarting: the caller drops its client and tries again next round). ``connect`` returns the client."""
    try:
        return connect().lpop(key, batch) or []
    except Exception:  # noqa: BLE001 - any connection failure is the same to a consumer: retry later
        return None


def decode(data: bytes) -> list:
    return msgpack.unpackb(data, raw=False)
