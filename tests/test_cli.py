"""The command line: bad values get one sentence and exit 2, with no traceback and nothing left running."""
import signal
import socket
import subprocess
import time

import pytest

from tests.conftest import LOADLAB, REPO, processes_mentioning, run_cli, wait_until


@pytest.mark.parametrize("args, words", [
    (["run", "no-such-scenario"], ["'no-such-scenario'", "smoke"]),
    (["run", "--broker", "redis//oops"], ["--broker", "redis://"]),
    (["run", "--duration", "-5s"], ["--duration", "-5s"]),
    (["run", "--serializer", "xml"], ["--serializer", "'xml'", "msgpack"]),
    (["run", "--serializer", "pickle"], ["--allow-pickle"]),
    (["run", "--workers", "many"], ["--workers", "many"]),
    (["up", "--pool", "fork"], ["--pool", "prefork"]),
    (["gate", "/nonexistent/run", "--rules", "x.yml"], ["/nonexistent/run", "report.json"]),
    (["report", "/nonexistent/run"], ["/nonexistent/run"]),
    (["bench", "overhead", "--public-api"], ["--public-api", "--instructions"]),
    (["bench", "overhead", "--instruction-payload-bytes", "4096"], ["--instruction-payload-bytes", "--instructions"]),
])
def test_bad_values_exit_2_with_one_sentence(args, words, tmp_path):
    result = run_cli(*args, "--out", str(tmp_path / "out"), timeout=60) if args[0] in ("run", "up") else \
        run_cli(*args, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word in result.stderr, result.stderr
    assert not processes_mentioning(str(tmp_path / "out"))


def test_environment_values_are_validated_too(tmp_path):
    result = run_cli("run", "--out", str(tmp_path), env={"LOADLAB_COMPRESSION": "rar"}, timeout=60)
    assert result.returncode == 2
    assert "--compression 'rar'" in result.stderr and "zstd" in result.stderr


def test_scenarios_lists_one_line_each():
    from loadlab.loadtests.scenarios import SCENARIOS

    result = run_cli("scenarios", timeout=60, env={"COLUMNS": "200"})
    assert result.returncode == 0
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:] if line.strip()}
    assert set(SCENARIOS) <= set(lines)
    for name, scenario in SCENARIOS.items():
        # closed models by their users; the open model by its arrival rate, with no users column to misread
        if scenario.open_arrivals:
            assert f"{scenario.users * scenario.rate_per_user:g} tasks/s arriving" in lines[name]
            assert "users" not in lines[name]
        else:
            assert f"{scenario.users} users × {scenario.rate_per_user:g}/s" in lines[name]


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_up_then_stop_leaves_no_process(tmp_path, stop_signal):
    out = tmp_path / "up"
    proc = subprocess.Popen([LOADLAB, "up", "--workers", "2", "--out", str(out)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: (out / "logs" / "api.log").exists() and len(processes_mentioning(str(out))) >= 4, 60,
                   what="the stack to start")
        lines = []
        wait_until(lambda: lines.append(proc.stdout.readline()) or "Ctrl-C" in lines[-1], 60, interval=0,
                   what="the stack to say it is up")
        assert len(processes_mentioning(str(out))) >= 4  # redis, 2 workers (+ pool children), api
    finally:
        _stop(proc, stop_signal, out)


def _stop(proc, stop_signal, out) -> None:
    """Signals ``loadlab up`` to stop and waits until no process of its run directory is left."""
    if proc.poll() is None:
        proc.send_signal(stop_signal)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    wait_until(lambda: not processes_mentioning(str(out)), 15, what="every child to exit")


def test_up_reports_a_worker_that_fails_to_start_and_leaves_nothing(tmp_path):
    out = tmp_path / "bad"
    started = time.monotonic()
    result = run_cli("up", "--app", "no_such_module:app", "--out", str(out), timeout=120)
    assert result.returncode == 1
    assert "worker1 exited" in result.stderr + result.stdout
    assert "no_such_module" in result.stderr + result.stdout  # the tail of its log
    assert time.monotonic() - started < 60
    wait_until(lambda: not processes_mentioning(str(out)), 15, what="every child to exit")


def test_up_binds_the_api_to_api_host(tmp_path):
    """--api-host is where the API listens (and the URL the stack gives out), not only what the port check probes."""
    import re
    import urllib.request

    out = tmp_path / "host"
    proc = subprocess.Popen([LOADLAB, "up", "--api-host", "127.0.0.2", "--out", str(out)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    try:
        wait_until(lambda: lines.append(proc.stdout.readline()) or "Ctrl-C" in lines[-1] or proc.poll() is not None,
                   90, interval=0, what="the stack to say it is up")
        match = re.search(r"producer API http://127\.0\.0\.2:(\d+)", "".join(lines))
        assert match, "".join(lines)
        port = int(match.group(1))
        with urllib.request.urlopen(f"http://127.0.0.2:{port}/healthz", timeout=5) as response:
            assert response.status == 200
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        _stop(proc, signal.SIGINT, out)


def test_without_a_terminal_a_run_prints_progress_lines_every_few_seconds(tmp_path):
    """In a CI log the load's progress comes as plain lines while it runs, not only at the end."""
    import re

    result = run_cli("run", "smoke", "--duration", "8s", "--progress-interval-s", "2", "--out", str(tmp_path / "r"),
                     timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    load = [tuple(map(int, m.groups())) for m in
            re.finditer(r"^load (\d+)s: (\d+) sent, (\d+) done, \d+ in flight, [\d.]+ done/s$", result.stdout, re.M)]
    assert len(load) >= 3, result.stdout
    assert [sent for _, sent, _ in load] == sorted(sent for _, sent, _ in load) and load[-1][1] > load[0][1]
    assert re.search(r"^drained \d+s: (\d+) sent, \1 done, 0 in flight", result.stdout, re.M), result.stdout
    assert "━" not in result.stdout  # no bar drawn into the log


def test_ctrl_c_during_the_load_writes_the_report_marked_interrupted_and_exits_130(tmp_path):
    import json

    import jsonschema

    from loadlab.reports.report import SCHEMA_PATH

    out = tmp_path / "int"
    proc = subprocess.Popen([LOADLAB, "run", "smoke", "--duration", "120s", "--progress-interval-s", "1",
                             "--out", str(out)], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    lines = []
    try:
        wait_until(lambda: lines.append(proc.stdout.readline()) or lines[-1].startswith("load ") or
                   proc.poll() is not None, 120, interval=0, what="the load to start")
        assert proc.poll() is None, "".join(lines)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=90)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, "".join(lines) + rest
    assert time.monotonic() - started < 60
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()))
    interrupted = report["interrupted"]
    assert interrupted["signal"] == "SIGINT" and interrupted["during"] == "load" and interrupted["at_s"] < 120
    assert report["tasks"]["submitted"] > 0 and report["verdict"]["status"] in ("warn", "fail")
    assert "interrupted by SIGINT" in report["verdict"]["problems"][0]
    assert (out / "report.html").is_file() and "Aborted" not in rest
    wait_until(lambda: not processes_mentioning(str(out)), 15, what="every child to exit")
