"""One short real run recorded by Debian's Prometheus (``loadlab run --prometheus``), shared by the tests that query
it (test_prometheus_live.py, test_dashboards_render.py): the run costs ~30 s, so it is made once per session."""
from __future__ import annotations

import time
from pathlib import Path

from tests.conftest import need_binary, processes_mentioning, run_cli

# smoke: every reference task, apply_async and the HTTP API, flaky tasks that retry; long enough for rate() windows
# to hold many 1 s scrapes while tasks run.
RUN_ARGS = ("run", "smoke", "--duration", "8s", "--users", "10", "--drain-timeout-s", "20", "--prometheus")

_runs: dict[str, Path | str] = {}


def recorded_run(tmp_path_factory) -> Path:
    """The run directory (made on first use); fails the caller if the run failed or left a process behind (a failed
    run is not tried again by the next test: they all fail with its message)."""
    need_binary("prometheus")
    if "smoke" not in _runs:
        _runs["smoke"] = _record(tmp_path_factory.mktemp("prometheus-run") / "run")
    result = _runs["smoke"]
    assert isinstance(result, Path), result
    return result


def _record(out: Path) -> Path | str:
    proc = run_cli(*RUN_ARGS, "--out", str(out), timeout=180)
    deadline = time.monotonic() + 15
    while processes_mentioning(str(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if processes_mentioning(str(out)):
        return f"processes outlived the run: {processes_mentioning(str(out))}"
    if proc.returncode != 0:
        return f"loadlab run --prometheus failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out
