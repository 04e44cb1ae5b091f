"""The ledger channel: producers and workers push one small record per event into a Redis list of the run;
the recorder (``loadlab.reports.recorder``) pops them. Record layouts are defined here once.

Why a Redis list and not Celery events: it works whatever the broker is (RabbitMQ, SQL backends), costs one
reply-less RPUSH per event on loopback, keeps arrival order per producer, and survives distributed Locust workers: every
producer process, the producer API included, writes to the same list, so one recorder sees the whole run.
"""
from __future__ import annotations

import os
import socket
import threading
import weakref
from urllib.parse import unquote, urlsplit

import msgpack

# Record kinds: the first element of every record.
SENT = "S"       # [SENT, task_id, task_name, sent_at, publish_seconds, intended_at, parent_id, root_id]
ATTEMPT = "A"    # [ATTEMPT, task_id, task_name, state, sent_at, attempt_sent_at, eta, started_at, body_done_at,
                 #  finished_at, retries, exception_type, intended_at, hostname, parent_id, root_id]
# parent_id, root_id: Celery's message headers (protocol 2) for a task another task published (chain, group, chord,
# ``.delay()`` in a task): the task that published it and the first task of its workflow. Both None for a task of its
# own (root_id is then its own id, not repeated: two nils instead of 36 bytes).
TERMINAL_STATES = ("SUCCESS", "FAILURE", "REVOKED", "REJECTED")

# Message header names carried from the first publish through every retry.
HEADER_SENT_AT = "loadlab_sent_at"
HEADER_ATTEMPT_SENT_AT = "loadlab_attempt_sent_at"
HEADER_INTENDED_AT = "loadlab_intended_at"


def channel_key(run_id: str) -> str:
    return f"loadlab:{run_id}:ledger"


class LedgerSink:
    """Pushes records to the run's ledger list without waiting for Redis to answer.

    Why: nothing acts on the answer (the ledger must never break the task it observes, so errors were always
    dropped), and a round trip per record cost ~80 us of CPU and ~110 us of wall time (redis-py's command path plus
    the wait) in every producer and pool process for every task: the harness's own cost inside each measured task.
    After ``CLIENT REPLY OFF`` a record is one ``sendall`` of a RESP command (~5 us). Records written before a process
    dies still arrive: they sit in the kernel's send buffer, and with no replies there is nothing unread to turn the
    close into a reset. Connects lazily and again in a forked child or after a failed write (that record is dropped, as
    before). URLs other than plain ``redis://`` (TLS, unix sockets) go through redis-py, one round trip each.
    """

    def __init__(self, url: str, run_id: str):
        self.url = url
        self.key = channel_key(run_id)
        self._command_prefix = b"*3\r\n$5\r\nRPUSH\r\n" + _bulk(self.key.encode())
        self._socket: socket.socket | None = None
        self._client = None  # redis-py, for URLs the plain socket does not speak
        self._lock = threading.Lock()  # greenlets or threads of one process share the socket: whole commands only
        self._plain = urlsplit(url).scheme == "redis"
        _SINKS.add(self)

    def _after_fork(self) -> None:
        # the child owns neither the parent's socket nor a lock another thread may have held at the fork
        self._lock = threading.Lock()
        self._socket = self._client = None

    def push(self, record: list) -> None:
        data = msgpack.packb(record, use_bin_type=True)
        if not self._plain:
            self._push_with_client(data)
            return
        command = self._command_prefix + _bulk(data)
        with self._lock:
            try:
                if self._socket is None:  # a forked child starts without one (_after_fork)
                    self._socket = self._connect()
                self._socket.sendall(command)
            except Exception:  # noqa: BLE001 - the ledger must never break the task it observes
                self._close()

    def _connect(self) -> socket.socket:
        parts = urlsplit(self.url)
        sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=5)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            handshake = []
            if parts.password is not None:
                auth = [b"AUTH", unquote(parts.username).encode()] if parts.username else [b"AUTH"]
                handshake.append(auth + [unquote(parts.password).encode()])
            database = (parts.path or "/").strip("/") or "0"
            if database != "0":
                handshake.append([b"SELECT", database.encode()])
            for command in handshake:  # these answer: a wrong password or database must not pass silently
                sock.sendall(_command(command))
                reply = _read_line(sock)
                if not reply.startswith(b"+"):
                    raise ConnectionError(reply.decode(errors="replace"))
            sock.sendall(_command([b"CLIENT", b"REPLY", b"OFF"]))
            return sock
        except BaseException:
            sock.close()
            raise

    def _close(self) -> None:
        if self._socket is not None:
            try:
                self._socket.close()
            except OSError:
                pass
        self._socket = None

    def _push_with_client(self, data: bytes) -> None:
        try:
            if self._client is None:
                import redis

                self._client = redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)
            self._client.rpush(self.key, data)
        except Exception:  # noqa: BLE001 - the ledger must never break the task it observes
            self._client = None


_SINKS: "weakref.WeakSet[LedgerSink]" = weakref.WeakSet()
os.register_at_fork(after_in_child=lambda: [sink._after_fork() for sink in list(_SINKS)])


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _command(parts: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(_bulk(part) for part in parts)


def _read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\r\n"):
        chunk = sock.recv(512)
        if not chunk:
            raise ConnectionError("the ledger Redis closed the connection")
        line += chunk
    return line


def pop_batch(connect, key: str, batch: int) -> list[bytes] | None:
    """Up to ``batch`` records from the channel, oldest first; None when the ledger Redis cannot be reached (it is
    restarting: the caller drops its client and tries again next round). ``connect`` returns the client."""
    try:
        return connect().lpop(key, batch) or []
    except Exception:  # noqa: BLE001 - any connection failure is the same to a consumer: retry later
        return None


def decode(data: bytes) -> list:
    return msgpack.unpackb(data, raw=False)
