"""Shared fixtures: real services (skip with a reason, or fail under LOADLAB_REQUIRE_SERVICES=1), isolated queues
and databases, and a check that no process of a test outlives it."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOADLAB = str(Path(sys.executable).with_name("loadlab"))
REQUIRE_SERVICES = os.environ.get("LOADLAB_REQUIRE_SERVICES") == "1"

MACHINE_REDIS = "redis://127.0.0.1:6379"
RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"
POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432"


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def need_service(name: str, host: str, port: int) -> None:
    if port_open(host, port):
        return
    message = f"{name} is not running on {host}:{port}"
    if REQUIRE_SERVICES:
        pytest.fail(message + " (LOADLAB_REQUIRE_SERVICES=1)")
    pytest.skip(message)


def need_binary(name: str) -> str:
    import shutil

    path = shutil.which(name)
    if path:
        return path
    if REQUIRE_SERVICES:
        pytest.fail(f"{name} is not installed (LOADLAB_REQUIRE_SERVICES=1; .ci/run installs Debian's prometheus)")
    pytest.skip(f"{name} is not installed")


TEST_QUEUE_PREFIX = "loadlab-test-"  # unique("loadlab-test-"): the queues tests make on shared brokers


def pytest_sessionfinish(session, exitstatus):
    """What the run's test queues leave on the machine's Redis, removed at the end. Deleting a queue does not delete
    kombu's binding tables for its exchange (``_kombu.binding.<queue>``, ``_kombu.binding_permanent.<queue>``: the
    default exchange is named after the queue), and they have no TTL: every CI run added a few. The names carry the
    test prefix and a random suffix, so only test keys match. Under pytest-xdist only the controller does it, once
    every worker has finished: a worker that finished first would delete the queues of tests still running.
    Results of the tests' tasks (``celery-task-meta-<uuid>``, which expire only after an hour) are found by the
    queue their extended result names."""
    if hasattr(session.config, "workerinput") or not port_open("127.0.0.1", 6379):
        return
    import redis

    for db in range(16):
        client = redis.Redis(host="127.0.0.1", port=6379, db=db)
        try:
            keys = list(client.scan_iter(match=f"*{TEST_QUEUE_PREFIX}*", count=1000))
            results = list(client.scan_iter(match="celery-task-meta-*", count=1000))
            marker = f'"queue": "{TEST_QUEUE_PREFIX}'.encode()
            for start in range(0, len(results), 1000):
                batch = results[start:start + 1000]
                keys += [key for key, value in zip(batch, client.mget(batch)) if value and marker in value]
            if keys:
                client.delete(*keys)
        finally:
            client.close()


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def processes_mentioning(marker: str) -> list[str]:
    """Processes whose command line or environment mentions ``marker`` (a unique run directory)."""
    found = []
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline or marker.encode() in environ:
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")[:160]
            found.append(f"{pid}: {command}")
    return found


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def assert_refused_before_start(procs: dict, words: dict, root: Path) -> None:
    """Each CLI process in ``procs`` (name -> Popen with piped text output, run with ``--out root/name``) exited 2
    with one sentence on stderr holding each of ``words[name]``, no traceback, no run directory and no process
    left behind."""
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        message = stderr.strip()
        assert proc.returncode == 2, (name, stdout, stderr)
        assert "Traceback" not in stdout + stderr and message.startswith("error: ") and "\n" not in message, message
        for word in words[name]:
            assert word in message, (name, word, message)
        assert not (root / name).exists()
    assert not processes_mentioning(str(root))


def run_cli(*args, timeout: float = 300, env: dict | None = None, cwd: Path | None = None):
    return subprocess.run([LOADLAB, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def run_dir(tmp_path):
    """A unique run directory; the test fails if any process that mentions it is still alive afterwards."""
    path = tmp_path / unique("run")
    path.mkdir()
    yield path
    deadline = time.monotonic() + 15
    while processes_mentioning(str(path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not processes_mentioning(str(path)), f"processes outlived the test: {processes_mentioning(str(path))}"


@pytest.fixture
def postgres_db():
    """A database of its own on the machine's PostgreSQL, dropped afterwards."""
    need_service("PostgreSQL", "127.0.0.1", 5432)
    import psycopg

    name = unique("loadlab_test_")
    admin = psycopg.connect(POSTGRES_DSN + "/postgres", autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"db+postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def delete_queue(app, queue: str) -> None:
    try:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
    except Exception:  # noqa: BLE001 - best effort cleanup
        pass
