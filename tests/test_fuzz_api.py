"""Schemathesis against the producer API of a real embedded stack, over real HTTP: at least 1000 generated requests
(positive and negative, every documented operation, plus POST → GET sequences through the spec's links), no 5xx,
and every response conforms to the OpenAPI document: documented status, content type and body schema; 405 with an
Allow header for undocumented methods; invalid input refused (4xx) and valid input accepted (2xx).

It runs the ``schemathesis`` CLI as a subprocess (its pytest integration does not work with pytest 9.2) and counts
the requests it made from the HAR report it writes."""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from loadlab.config.settings import Settings
from loadlab.stack.supervisor import Stack
from tests.conftest import REPO, unique

SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
MIN_REQUESTS = 1000
HOOKS = REPO / "tests" / "schemathesis_hooks.py"
# Budget: coverage (every boundary and type-violation case the spec defines, ~160 requests), fuzzing (~170 cases per
# operation with inputs: ~850) and stateful POST → GET sequences through the spec's links (~200): ~1200 in all.
CONFIG = """
[phases.fuzzing.generation]
max-examples = 170

[phases.stateful.generation]
max-examples = 30
"""


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory):
    settings = Settings.build(run_id=unique("fuzz"), workers="1", concurrency="2")
    with Stack(settings, tmp_path_factory.mktemp("fuzz")) as stack:
        yield stack


def _har_entries(report_dir: Path) -> list[dict]:
    entries = []
    for path in sorted(report_dir.glob("*.json")):
        entries += json.loads(path.read_text())["log"]["entries"]
    return entries


def test_schemathesis_finds_no_5xx_and_no_response_off_the_spec(fuzz_stack, tmp_path):
    api_url = fuzz_stack.settings.api_url
    report_dir = tmp_path / "report"
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [SCHEMATHESIS, "--config-file", str(config), "run", f"{api_url}/openapi.json",
               "--checks", "all",
               "--phases", "examples,coverage,fuzzing,stateful",
               "--workers", "2",
               "--request-timeout", "15",
               "--continue-on-failure",
               "--report", "har", "--report-dir", str(report_dir),
               "--no-color"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS), "NO_COLOR": "1", "COLUMNS": "120"}
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    elapsed = time.monotonic() - started
    output = result.stdout[-12_000:] + result.stderr[-4_000:]
    assert result.returncode == 0, f"schemathesis failed after {elapsed:.0f}s:\n{output}"

    entries = _har_entries(report_dir)
    statuses = collections.Counter(entry["response"]["status"] for entry in entries)
    print(f"schemathesis: {len(entries)} requests in {elapsed:.0f}s, by status {dict(sorted(statuses.items()))}")
    assert len(entries) >= MIN_REQUESTS, f"only {len(entries)} requests: {dict(statuses)}\n{output}"
    assert not [s for s in statuses if s >= 500 or s == 0], dict(statuses)
    # both sides of validation were reached: accepted submits, refused arguments, real task ids looked up
    assert statuses[202] >= 100 and statuses[422] >= 100 and statuses[405] > 0 and statuses[200] > 0, dict(statuses)
    paths = {entry["request"]["url"].removeprefix(api_url).split("?")[0] for entry in entries}
    assert {"/tasks/noop", "/tasks/cpu", "/tasks/io", "/tasks/flaky", "/tasks/payload", "/healthz"} <= paths

    assert fuzz_stack.api.running(), "the API process died"
    assert httpx.get(f"{api_url}/healthz", timeout=10).status_code == 200
