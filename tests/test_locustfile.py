"""The plain ``locust -f loadtests/locustfile.py`` command against a running stack (as in the compose file): it loads
the stack and serves the load generator's /metrics on LOADLAB_METRICS_PORT while it runs."""
import os
import subprocess
import sys
from pathlib import Path

import httpx

from loadlab.config.settings import Settings
from loadlab.stack.embedded import free_port
from loadlab.stack.supervisor import Stack
from tests.conftest import unique, wait_until

ROOT = Path(__file__).resolve().parents[1]


def _sample(text: str, name: str) -> float:
    """Sum of a metric's samples in an exposition text (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_plain_locust_serves_load_generator_metrics(tmp_path):
    settings = Settings.build(run_id=unique(), metrics="on")
    with Stack(settings, tmp_path / "stack") as stack:
        port = free_port()
        env = {**os.environ, **stack.settings.child_env(), "LOADLAB_METRICS_PORT": str(port),
               "LOADLAB_SCENARIO": "smoke"}
        env.pop("LOADLAB_SETTINGS_JSON", None)  # as a user would run it: from LOADLAB_* variables only
        env.update({"LOADLAB_BROKER": stack.settings.broker, "LOADLAB_BACKEND": stack.settings.backend,
                    "LOADLAB_API_URL": stack.settings.api_url, "LOADLAB_LEDGER_URL": stack.settings.ledger_url,
                    "LOADLAB_RUN_ID": stack.settings.run_id})
        locust = subprocess.Popen([sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py", "--headless",
                                   "-u", "4", "-r", "4", "-t", "30s", "--only-summary"], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            url = f"http://127.0.0.1:{port}/metrics"

            def served():
                try:
                    text = httpx.get(url, timeout=2).text
                except httpx.HTTPError:
                    return None
                done = _sample(text, "loadlab_task_end_to_end_seconds_count")
                return text if _sample(text, "celery_task_sent_total") > 0 and done > 0 else None

            text = wait_until(served, timeout=60, what="the load generator's /metrics with sent and finished tasks")
            assert "loadlab_tasks_in_flight" in text
            assert _sample(text, "celery_task_serialization_seconds_count") > 0  # the producer's encode side
        finally:
            locust.terminate()
            output = locust.communicate(timeout=30)[0]
        assert "Traceback" not in output, output[-3000:]
