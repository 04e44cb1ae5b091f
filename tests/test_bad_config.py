"""Bad configuration is refused up front: every settings field (as a flag and as a LOADLAB_* variable), scenario
name, gate file and command option gets exit 2 and one sentence naming the option, the bad value and what is
accepted; no traceback; nothing created or started (the --out directory does not even exist afterwards).

Most cases run in one fresh interpreter through click's CliRunner (commands that run Locust patch the process
with gevent, so never in the pytest process), a few through the real ``loadlab`` executable."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from loadlab.config.settings import Settings
from tests.conftest import LOADLAB, REPO, processes_mentioning

# Fields the CLI sets itself (wiring between processes); SCENARIO has cases of its own below.
NOT_USER_SETTINGS = {"run_id", "ledger_url", "api_url", "run_dir", "explicit", "scenario"}

# An invalid value per field whose type alone does not give one (str fields with a validator or a pattern).
# A new str field that accepts anything fails test_every_setting_is_validated until it is validated or listed here.
INVALID_TEXT = {
    "broker": "kafka://127.0.0.1:9092",
    "backend": "mongodb://127.0.0.1/results",
    "app": "no colon here",
    "queue": "has spaces!",
    "queues": "celery,has spaces!",
    "tasks": "/no/such/tasks.yml",
    "metrics_host": "not a host!",
    "api_host": "http://0.0.0.0:80",
    "chaos": "explode",
    "duration": "soon",
}
INVALID_BY_TYPE = {int: "many", float: "lots", bool: "maybe"}
OUT_OF_RANGE = {int: "-5", float: "nan"}

BATCH = r'''
import json, os, signal, sys, traceback
from click.testing import CliRunner
from loadlab.cli.main import main

def no_exec(path, argv, env):  # `loadlab api` and `exporter` exec a server: a case must never get that far
    raise RuntimeError("reached execve: " + " ".join(map(str, argv)))
os.execve = no_exec

class TooSlow(BaseException):
    pass

def alarm(*_):
    raise TooSlow("the command did not fail within 20 s: it started something")
signal.signal(signal.SIGALRM, alarm)
results = []
for args, env in json.load(sys.stdin):
    signal.alarm(20)
    try:
        result = CliRunner().invoke(main, args, env=env, catch_exceptions=True)
    finally:
        signal.alarm(0)
    error = result.exception
    crash = None if error is None or isinstance(error, SystemExit) else "".join(traceback.format_exception(error))
    results.append({"code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr, "crash": crash})
json.dump(results, sys.stdout)
'''


def run_batch(cases: list[tuple[list[str], dict[str, str]]]) -> list[dict]:
    """Run ``loadlab`` argument lists (with extra environment) in one fresh interpreter; one result per case."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOADLAB_")}
    done = subprocess.run([sys.executable, "-c", BATCH], input=json.dumps(cases), capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _base_type(annotation):
    kinds = [t for t in (typing.get_args(annotation) or (annotation,)) if t is not type(None)]
    return kinds[0] if typing.get_origin(annotation) is not typing.Literal else annotation


def _invalid_values(name: str, info) -> list[str]:
    kind = _base_type(info.annotation)
    if name in INVALID_TEXT:
        return [INVALID_TEXT[name]]
    if typing.get_origin(kind) is typing.Literal:
        return ["bogus"]
    if kind in INVALID_BY_TYPE:
        values = [INVALID_BY_TYPE[kind]]
        if kind in OUT_OF_RANGE and any(getattr(m, a, None) is not None for m in info.metadata
                                        for a in ("ge", "gt", "le", "lt")):
            values.append(OUT_OF_RANGE[kind])
        return values
    return ["no such value!"]  # a str field with no validation: the test below fails for it


# settings that are a flag of one command only (the others take them from the environment)
COMMAND_OF = {"standalone_api_port": "api", "exporter_port": "exporter", "exporter_interval_s": "exporter",
              "web_port": "ui", "tasks": "run",
              "allow_foreign_consumers": "run"}


def _setting_cases(out: Path):
    """(id, args, env, option, value, variable) for every user-facing setting, as a flag and as an env var."""
    for name, info in Settings.model_fields.items():
        if name in NOT_USER_SETTINGS:
            continue
        option, variable = "--" + name.replace("_", "-"), "LOADLAB_" + name.upper()
        for index, value in enumerate(_invalid_values(name, info)):
            if _base_type(info.annotation) is not bool:  # bool settings are --x/--no-x switches
                command = COMMAND_OF.get(name, "run")
                yield (f"{name}-flag-{index}", [command, option, value] + (
                    ["--out", str(out / f"{name}-flag-{index}")] if command in ("run", "ui") else []), {},
                       option, value, None)
            yield (f"{name}-env-{index}", ["run", "--out", str(out / f"{name}-env-{index}")], {variable: value},
                   option, value, variable)


def _assert_one_sentence(result: dict, *words: str) -> str:
    output = result["stdout"] + result["stderr"]
    assert result["crash"] is None, result["crash"]
    assert "Traceback" not in output, output
    assert result["code"] == 2, output
    message = result["stderr"].strip()
    assert message.startswith("error: ") and "\n" not in message and message.endswith("."), message
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    return message


def test_every_setting_is_validated_as_a_flag_and_as_an_environment_variable(tmp_path):
    cases = list(_setting_cases(tmp_path))
    assert len(cases) > 60  # ~35 fields, most with two bad values, each as a flag and as a variable
    failures = []
    for (case_id, _args, _env, option, value, variable), result in zip(cases, run_batch([c[1:3] for c in cases])):
        try:
            message = _assert_one_sentence(result, option, repr(value))
            assert "; use " in message or " use " in message, message  # what is accepted
            if variable:
                assert variable in message, message
        except AssertionError as exc:
            failures.append(f"{case_id}: {exc}")
    assert not failures, "\n".join(failures)
    assert not any(tmp_path.iterdir()), f"created: {list(tmp_path.iterdir())}"
    assert not processes_mentioning(str(tmp_path))


def _gate_files(root: Path) -> dict[str, tuple[Path, list[str]]]:
    """name -> (rules file, words its error must contain)."""
    texts = {
        "typo-key": ("gates:\n  - metric: tasks.lost\n    mx: 0\n", ["'mx'", "did you mean 'max'", "rule 1"]),
        "not-yaml": ("gates: [\n", ["not valid YAML", "line"]),
        "empty": ("", ["empty", "gates:"]),
        "no-gates-key": ("rules:\n  - metric: tasks.lost\n", ["no top-level 'gates:'", "rules"]),
        "not-a-list": ("gates: tasks.lost\n", ["'gates' must be a list"]),
        "empty-list": ("gates: []\n", ["empty", "at least one rule"]),
        "no-metric": ("gates:\n  - max: 3\n", ["rule 1", "metric"]),
        "no-check": ("gates:\n  - metric: tasks.lost\n", ["none of 'min', 'max' or 'max_regression'"]),
        "text-bound": ("gates:\n  - metric: tasks.lost\n    max: lots\n", ["max", "lots"]),
        "min-over-max": ("gates:\n  - metric: tasks.lost\n    min: 5\n    max: 1\n", ["min", "max"]),
        "bad-regression": ("gates:\n  - metric: latency_ms.end_to_end.p95\n    max_regression: ten%\n",
                           ["max_regression", "ten%"]),
        "bad-direction": ("gates:\n  - metric: tasks.lost\n    max: 0\n    direction: up\n", ["direction", "up"]),
        "duplicate-key": ("gates:\n  - metric: tasks.lost\n    max: 0\n    max: 1\n", ["duplicate key 'max'"]),
        "rule-not-mapping": ("gates:\n  - tasks.lost\n", ["rule 1", "mapping"]),
        "binary": (None, ["not UTF-8"]),
    }
    files = {}
    for name, (text, words) in texts.items():
        path = root / f"{name}.yml"
        if text is None:
            path.write_bytes(b"gates:\n  - metric: \xff\xfe\n")
        else:
            path.write_text(text)
        files[name] = (path, words)
    files["missing"] = (root / "missing.yml", ["does not exist"])
    files["directory"] = (root, ["is a directory"])
    return files


def test_gate_files_scenarios_and_command_options_are_refused_up_front(tmp_path):
    out = tmp_path / "out"
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    good_rules = rules_dir / "good.yml.txt"
    good_rules.write_text("gates:\n  - metric: tasks.lost\n    max: 0\n")
    cases: list[tuple[str, list[str], dict, list[str]]] = []
    for name, (path, words) in _gate_files(rules_dir).items():
        cases.append((f"gates-{name}", ["run", "--gates", str(path), "--out", str(out / name)], {}, [str(path), *words]))
    cases += [
        ("gate-baseline-missing", ["run", "--gates", str(good_rules), "--baseline", str(tmp_path / "nope"),
                                   "--out", str(out / "bl")], {}, ["--baseline", "report.json"]),
        ("baseline-without-gates", ["run", "--baseline", str(tmp_path), "--out", str(out / "bl2")], {},
         ["--baseline", "--gates"]),
        ("scenario-run", ["run", "no-such-scenario", "--out", str(out / "s1")], {}, ["'no-such-scenario'", "smoke"]),
        ("scenario-ui", ["ui", "smok", "--out", str(out / "s2")], {}, ["'smok'", "smoke"]),
        ("scenario-sweep", ["sweep", "saturated", "--out", str(out / "s3")], {}, ["'saturated'", "saturate"]),
        ("scenario-env", ["run", "--out", str(out / "s4")], {"LOADLAB_SCENARIO": "soakk"}, ["'soakk'", "soak"]),
        ("sweep-workers", ["sweep", "--workers", "1,two", "--out", str(out / "w1")], {}, ["--workers", "'1,two'"]),
        ("sweep-concurrency", ["sweep", "--concurrency", "0", "--out", str(out / "w2")], {}, ["--concurrency", "'0'"]),
        ("sweep-pool", ["sweep", "--pool", "prefork,fork", "--out", str(out / "w3")], {}, ["--pool", "'fork'"]),
        ("serialization-serializer", ["serialization", "--serializers", "json,xml", "--out", str(out / "z1")], {},
         ["--serializer", "'xml'"]),
        ("serialization-shape", ["serialization", "--shapes", "cubes", "--out", str(out / "z2")], {},
         ["--shapes", "'cubes'", "nested_dicts"]),
        ("serialization-compression", ["serialization", "--compressions", "rar", "--out", str(out / "z3")], {},
         ["--compressions", "'rar'", "zlib"]),
        ("serialization-sizes", ["serialization", "--sizes", "100,-1", "--out", str(out / "z4")], {},
         ["--sizes", "'100,-1'"]),
        ("serialization-inband", ["serialization", "--inband-sizes", "big", "--out", str(out / "z5")], {},
         ["--inband-sizes", "'big'"]),
        ("out-not-writable", ["run", "--out", "/proc/loadlab-cannot-write-here"], {}, ["--out", "writable"]),
        ("exporter-without-broker", ["exporter"], {}, ["--broker", "LOADLAB_BROKER"]),
        ("exporter-queues", ["exporter", "--broker", "redis://127.0.0.1:1/0", "--queues", "a b"], {},
         ["--queues", "'a b'"]),
        ("api-without-broker", ["api"], {}, ["--broker"]),
        ("report-no-run", ["report", str(tmp_path / "nope")], {}, ["RUN_DIR", "report.json"]),
        ("gate-no-run", ["gate", str(tmp_path / "nope"), "--rules", str(good_rules)], {}, ["RUN_DIR", "report.json"]),
    ]
    failures = []
    for (case_id, _args, _env, words), result in zip(cases, run_batch([(c[1], c[2]) for c in cases])):
        try:
            _assert_one_sentence(result, *words)
        except AssertionError as exc:
            failures.append(f"{case_id}: {exc}")
    assert not failures, "\n".join(failures)
    assert not out.exists() or not any(out.iterdir()), f"created: {list(out.iterdir())}"
    assert not processes_mentioning(str(out))


@pytest.mark.parametrize("args", [
    ["bench", "publish", "--rounds", "0"], ["bench", "exporter", "--events", "5"],
    ["serialization", "--budget-s", "-3"],
    ["run", "--wrokers", "2"],
])
def test_click_checked_options_exit_2_naming_the_option(tmp_path, args):
    # click's own checks: a usage line, then "Error: Invalid value for '--web-port': 0 is not in the range …"
    (result,) = run_batch([(args + (["--out", str(tmp_path / "o")] if args[0] != "exporter" else []), {})])
    assert result["code"] == 2 and result["crash"] is None, result
    option = args[-2]
    assert "Error:" in result["stderr"] and option in result["stderr"], result["stderr"]
    assert not (tmp_path / "o").exists()


def test_the_real_command_refuses_bad_values_in_parallel_and_leaves_nothing(tmp_path):
    """The installed ``loadlab`` executable, several at once: exit 2, one sentence on stderr, nothing running."""
    rules = tmp_path / "typo.yml"
    rules.write_text("gates:\n  - metric: tasks.lost\n    mx: 0\n")
    runs = {
        "flag": (["run", "--workers", "many"], {}, ["--workers", "'many'", "whole number", "1 to 64"]),
        "env-bool": (["up"], {"LOADLAB_ACKS_LATE": "maybe"}, ["--acks-late", "'maybe'", "LOADLAB_ACKS_LATE"]),
        "env-queue": (["run"], {"LOADLAB_QUEUE": "a b"}, ["--queue", "'a b'", "LOADLAB_QUEUE"]),
        "host": (["up", "--api-host", "no such host!"], {}, ["--api-host", "'no such host!'", "127.0.0.1"]),
        "gates": (["run", "--gates", str(rules)], {}, [str(rules), "'mx'"]),
        "scenario": (["run", "smokey"], {}, ["'smokey'", "smoke"]),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOADLAB_")}
    procs = {}
    for name, (args, extra, _words) in runs.items():
        procs[name] = subprocess.Popen([LOADLAB, *args, "--out", str(tmp_path / name)], cwd=REPO, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**env, **extra})
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, stdout, stderr)
        assert "Traceback" not in stdout + stderr
        message = stderr.strip()
        assert message.startswith("error: ") and "\n" not in message, message
        for word in runs[name][2]:
            assert word in message, (name, word, message)
        assert not (tmp_path / name).exists()
    assert not processes_mentioning(str(tmp_path))


def test_misspelled_environment_variables_are_refused_naming_the_setting(tmp_path):
    """A typo in a LOADLAB_* name would leave its setting at the default without a word: it is refused instead."""
    typo, unknown = run_batch([
        (["run", "--out", str(tmp_path / "typo")], {"LOADLAB_WORKRS": "3"}),
        (["up", "--out", str(tmp_path / "unknown")], {"LOADLAB_XYZZY": "1"}),
    ])
    _assert_one_sentence(typo, "LOADLAB_WORKRS", "did you mean LOADLAB_WORKERS?")
    message = _assert_one_sentence(unknown, "LOADLAB_XYZZY", "not a loadlab setting")
    assert "did you mean" not in message  # no far-fetched suggestion
    assert not (tmp_path / "typo").exists() and not (tmp_path / "unknown").exists()


def test_an_explicit_port_in_use_is_refused_before_anything_starts(tmp_path):
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        api, flower = run_batch([
            (["run", "--api-port", str(port), "--out", str(tmp_path / "api")], {}),
            (["up", "--flower", "--flower-port", str(port), "--out", str(tmp_path / "flower")], {}),
        ])
    _assert_one_sentence(api, "--api-port", str(port), "in use")
    _assert_one_sentence(flower, "--flower-port", str(port), "in use")
    assert not (tmp_path / "api").exists() and not (tmp_path / "flower").exists()
