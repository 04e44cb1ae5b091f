"""A broker or result backend that cannot be used is named at once: one sentence with the option, the URL (password
masked), host:port and the cause, exit 2, within seconds, nothing started or created."""
from __future__ import annotations

import time

import pytest

from tests.conftest import POSTGRES_DSN, RABBITMQ, need_service, processes_mentioning, run_cli, unique


def _refused(tmp_path, *args, words=()):
    out = tmp_path / "out"
    started = time.monotonic()
    result = run_cli("run", "smoke", "--duration", "2s", *args, "--out", str(out), timeout=60)
    took = time.monotonic() - started
    message = result.stderr.strip()
    assert result.returncode == 2, result.stdout[-1500:] + result.stderr[-1500:]
    assert "Traceback" not in result.stdout + result.stderr
    assert message.startswith("error: ") and "\n" not in message and message.endswith("."), message
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    assert took < 20, f"took {took:.1f}s"
    assert not out.exists() and not processes_mentioning(str(out))
    return message


def test_a_redis_broker_nobody_listens_on_is_named_at_once(tmp_path):
    _refused(tmp_path, "--broker", "redis://127.0.0.1:1/0", words=("--broker", "127.0.0.1:1", "connection refused"))


def test_a_wrong_amqp_password_is_one_sentence_with_the_password_masked(tmp_path):
    need_service("RabbitMQ", "127.0.0.1", 5672)
    message = _refused(tmp_path, "--broker", "amqp://guest:not-the-password@127.0.0.1:5672//",
                       words=("--broker", "127.0.0.1:5672", "ACCESS_REFUSED", "guest:***@"))
    assert "not-the-password" not in message


def test_a_postgresql_backend_whose_database_does_not_exist(tmp_path):
    need_service("PostgreSQL", "127.0.0.1", 5432)
    need_service("RabbitMQ", "127.0.0.1", 5672)
    name = unique("loadlab_absent_")
    backend = "db+" + POSTGRES_DSN + f"/{name}"
    _refused(tmp_path, "--broker", RABBITMQ, "--backend", backend,
             words=("--backend", "127.0.0.1:", f'database "{name}" does not exist'))


@pytest.mark.parametrize("command", [["up"], ["api"], ["exporter"]])
def test_the_other_commands_check_too(tmp_path, command):
    result = run_cli(*command, "--broker", "redis://127.0.0.1:1/0", timeout=60)
    assert result.returncode == 2 and "127.0.0.1:1" in result.stderr and "Traceback" not in result.stderr
