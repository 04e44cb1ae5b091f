import json

import pytest

from loadlab.config.settings import SETTINGS_ENV, Settings, SettingsError, mask_url, parse_duration


def test_precedence_defaults_env_flags(monkeypatch):
    monkeypatch.delenv(SETTINGS_ENV, raising=False)
    assert Settings.build().concurrency == Settings.model_fields["concurrency"].default
    monkeypatch.setenv("LOADLAB_CONCURRENCY", "7")
    assert Settings.build().concurrency == 7
    assert Settings.build(concurrency="3").concurrency == 3
    assert Settings.build(concurrency=None).concurrency == 7  # a flag not given leaves the environment in force


def test_child_processes_get_the_parents_settings(monkeypatch):
    parent = Settings.build(workers="3", serializer="msgpack", broker="redis://:pw@127.0.0.1:1/0")
    monkeypatch.setenv(SETTINGS_ENV, parent.child_env()[SETTINGS_ENV])
    monkeypatch.setenv("LOADLAB_WORKERS", "9")  # ignored: the parent's object wins in a child
    child = Settings.from_env()
    assert child == parent


@pytest.mark.parametrize("url, masked", [
    ("redis://:secret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("amqp://guest:secret@127.0.0.1:5672//", "amqp://guest:***@127.0.0.1:5672//"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
])
def test_mask_url(url, masked):
    assert mask_url(url) == masked


def test_masked_settings_hide_passwords():
    s = Settings.build(broker="amqp://u:hunter2@127.0.0.1:5672//", backend="redis://:hunter2@127.0.0.1/1")
    assert "hunter2" not in json.dumps(s.masked())


@pytest.mark.parametrize("kwargs, words", [
    ({"serializer": "xml"}, ["--serializer", "'xml'", "json"]),
    ({"broker": "kafka://127.0.0.1"}, ["--broker", "kafka://", "redis://"]),
    ({"broker": "redis://127.0.0.1:notaport/0"}, ["--broker", "malformed"]),
    ({"duration": "-5s"}, ["--duration", "-5s"]),
    ({"duration": "soon"}, ["--duration", "soon", "30s"]),
    ({"serializer": "pickle"}, ["--allow-pickle"]),
    ({"workers": "0"}, ["--workers"]),
    ({"app": "no colon"}, ["--app", "module:attr"]),
])
def test_bad_values_name_the_value_and_what_is_accepted(kwargs, words):
    with pytest.raises(SettingsError) as info:
        Settings.build(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_pickle_with_consent_is_accepted():
    s = Settings.build(serializer="pickle", allow_pickle=True)
    assert "pickle" in s.accept_content
    assert "pickle" not in Settings.build().accept_content


@pytest.mark.parametrize("text, seconds", [("30s", 30), ("2m", 120), ("1h30m", 5400), ("45", 45), ("1.5s", 1.5)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_each_app_in_a_process_runs_its_own_reference_tasks_with_its_own_settings():
    """A sweep or campaign makes one app per point in one process: the second app's flaky task keeps its own retry
    policy (Celery's shared tasks would hand it the first app's callable, with a DuplicateTaskNameWarning)."""
    import warnings

    from loadlab.stack.app import make_app

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = make_app(Settings(retry_max_retries=3, retry_backoff_s=1))
        second = make_app(Settings(retry_max_retries=7, retry_backoff_s=0))
        assert first.tasks["loadlab.flaky"].max_retries == 3 and second.tasks["loadlab.flaky"].max_retries == 7
        assert first.tasks["loadlab.flaky"].retry_backoff == 1 and second.tasks["loadlab.flaky"].retry_backoff == 0
