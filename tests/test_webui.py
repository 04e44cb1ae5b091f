"""``loadlab ui``: the Locust web UI with the Celery tab, driven in a real headless Chromium, and the tab's JSON
endpoint checked against the recorder it reads."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import LOADLAB, REPO, REQUIRE_SERVICES, processes_mentioning, run_cli, unique, wait_until

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = Path(os.environ.get("LOADLAB_ARTIFACTS_DIR", REPO / "reports" / "artifacts"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def need_chromium() -> str:
    """Debian's chromium and the playwright package (no browser download: playwright drives the system binary)."""
    path = shutil.which("chromium")
    problem = None
    if not path:
        problem = "chromium is not installed (.ci/run installs Debian's chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "the playwright package is not installed (pip install -e '.[test]')"
    if problem:
        if REQUIRE_SERVICES:
            pytest.fail(problem + " (LOADLAB_REQUIRE_SERVICES=1)")
        pytest.skip(problem)
    return path


def get_json(url: str, timeout: float = 5) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def ui_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except Exception:  # noqa: BLE001
        return False


def metric_value(page, metric: str) -> str:
    row = page.locator("tr", has=page.locator("td", has_text=metric))
    return row.first.locator("td").nth(1).inner_text().strip() if row.count() else ""


@pytest.mark.timeout(120)
def test_celery_tab_in_headless_chromium(run_dir):
    chromium = need_chromium()
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (run_dir / "ui-stdout.log").open("w")
    proc = subprocess.Popen([LOADLAB, "ui", "--web-port", str(port), "--out", str(run_dir)], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: ui_ready(url) or proc.poll() is not None, 60, 0.2, "the web UI")
        assert proc.poll() is None, (run_dir / "ui-stdout.log").read_text()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                page.goto(url)
                # scenarios are user classes in the picker: start from none, pick the smoke scenario's two classes
                page.locator("table tr").first.locator("input[type=checkbox]").uncheck()
                for name in ("Smoke_CeleryTaskUser", "Smoke_ApiTaskUser"):
                    page.locator("tr", has_text=name).locator("input[type=checkbox]").check()
                page.fill("input[name=userCount]", "4")
                page.fill("input[name=spawnRate]", "4")
                page.get_by_role("button", name="Start").click()
                page.get_by_role("tab", name="Celery").click()
                page.wait_for_selector("td:has-text('Tasks succeeded')", timeout=15_000)
                deadline = time.monotonic() + 25
                while time.monotonic() < deadline:
                    succeeded = metric_value(page, "Tasks succeeded")
                    e2e = metric_value(page, "Latency end to end")
                    if succeeded.isdigit() and int(succeeded) >= 20 and e2e.isdigit() and int(e2e) > 0:
                        break
                    page.wait_for_timeout(500)
                else:
                    pytest.fail(f"the Celery tab never showed finished tasks:\n{page.locator('table').last.inner_text()}")
                assert metric_value(page, "Workers up") == "1 / 1"
                assert metric_value(page, "Queue depth (celery)").isdigit()
                assert int(metric_value(page, "Tasks submitted")) >= int(succeeded)
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                shot = ARTIFACTS / "webui-celery-tab.png"
                page.screenshot(path=str(shot), full_page=True)
                print(f"\nscreenshot of the Celery tab: {shot}")
                # the selection reached the server: only the smoke scenario's classes run
                tasks = get_json(f"{url}/tasks")
                assert set(tasks["per_class"]) == {"Smoke_CeleryTaskUser", "Smoke_ApiTaskUser"}
            finally:
                browser.close()
        stats = get_json(f"{url}/celery/stats")
        t = stats["tasks"]
        assert t["succeeded"] > 0 and t["submitted"] >= t["succeeded"] + t["failed"]
        assert stats["latency_ms"]["end_to_end"]["count"] > 0 and stats["latency_ms"]["end_to_end"]["p99"] > 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        log.close()
    assert code == 0, (run_dir / "ui-stdout.log").read_text()
    wait_until(lambda: not processes_mentioning(str(run_dir)), 15, 0.2, "every process of the stack to exit")
    assert (run_dir / "settings.json").is_file() and (run_dir / "logs").is_dir()


# Importing Locust monkey-patches the importing process with gevent, so the endpoint is exercised in a process of its
# own (patched first, like `loadlab ui`), which prints what the endpoint and the recorder say.
ENDPOINT_SCRIPT = textwrap.dedent("""
    from gevent import monkey; monkey.patch_all()
    import json, sys
    from pathlib import Path
    sys.argv[1:] = []  # Locust's web UI parses sys.argv for its form's extra options
    from loadtests.users import celery_client
    from loadtests.webui import CeleryMonitor, install_celery_tab, ui_environment
    from reports.recorder import REPORT_PHASES, Recorder, histogram_stats_ms
    from stack.settings import Settings
    from stack.supervisor import Stack

    settings = Settings.build(run_id=__RUN_ID__)
    with Stack(settings, Path(__RUN_DIR__), api=False, log=lambda *a: None) as stack:
        s = stack.settings
        recorder = Recorder(s.ledger_url, s.run_id, max_retries=s.retry_max_retries).start()
        monitor = CeleryMonitor(s, expected_workers=s.workers)
        env = ui_environment(s)
        runner = env.create_local_runner()
        try:
            web_ui = env.create_web_ui("127.0.0.1", 0, delayed_start=True, userclass_picker_is_active=True)
            install_celery_tab(env, lambda: recorder, monitor)
            client = web_ui.app.test_client()
            before = client.get("/celery/stats").get_json()
            app = celery_client(s)  # the Locust users' producer, with the ledger hooks
            for i in range(20):
                app.send_task("loadlab.noop")
            for i in range(10):
                app.send_task("loadlab.flaky", kwargs={"p": 0.5})
            drained = recorder.drain(40)
            monitor.refresh_queue()
            monitor.refresh_workers()
            out = {
                "before": before,
                "drained": drained,
                "endpoint": client.get("/celery/stats").get_json(),
                "stats_requests": client.get("/stats/requests").get_json(),
                "csv": client.get("/celery/stats/csv").get_data(as_text=True),
                "recorder": {"counts": recorder.counts, "outstanding": recorder.outstanding,
                             "tasks_retried": recorder.tasks_retried, "exhausted": recorder.exhausted,
                             "latency_ms": {p: histogram_stats_ms(recorder.histograms[p]) for p in REPORT_PHASES}},
            }
        finally:
            runner.quit()
            monitor.stop()
            recorder.close()
    print("RESULT " + json.dumps(out))
""")


def test_stats_endpoint_returns_the_recorders_numbers(run_dir):
    script = ENDPOINT_SCRIPT.replace("__RUN_ID__", repr(unique())).replace("__RUN_DIR__", repr(str(run_dir)))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    data, rec = result["endpoint"], result["recorder"]
    c = rec["counts"]
    assert result["before"]["tasks"]["submitted"] == 0
    assert result["drained"], f"{rec['outstanding']} tasks still in flight"
    assert data["tasks"]["submitted"] == c["submitted"] == 30
    assert data["tasks"]["succeeded"] == c["succeeded"] > 0
    assert data["tasks"]["failed"] == c["failed"]
    assert data["tasks"]["succeeded"] + data["tasks"]["failed"] == 30
    assert data["tasks"]["in_flight"] == rec["outstanding"] == 0
    assert data["retries"] == {"retried": c["retried"], "tasks_retried": rec["tasks_retried"],
                               "exhausted": rec["exhausted"]}
    assert data["latency_ms"] == rec["latency_ms"]
    assert data["latency_ms"]["end_to_end"]["count"] == 30 and data["latency_ms"]["end_to_end"]["p50"] > 0
    assert data["latency_ms"]["publish"]["count"] == 30
    assert data["workers"]["up"] == 1 and data["workers"]["error"] is None
    assert data["queue"]["depth"] == 0 and data["queue"]["error"] is None

    # the tab itself reads the same numbers from the extended_stats of /stats/requests, which the UI polls
    (celery,) = [entry for entry in result["stats_requests"]["extended_stats"] if entry["key"] == "celery"]
    rows = {row["metric"]: row for row in celery["data"]}
    assert rows["Tasks submitted"]["value"] == 30
    assert rows["Tasks succeeded"]["value"] == c["succeeded"]
    assert rows["Workers up"]["value"] == "1 / 1"
    assert rows["Queue depth (celery)"]["value"] == 0
    e2e = data["latency_ms"]["end_to_end"]
    assert rows["Latency end to end (samples)"]["value"] == 30
    assert rows["Latency end to end (samples)"]["p95"] == round(e2e["p95"], 1)
    assert "Tasks submitted,30" in result["csv"]


def test_busy_web_port_is_a_usage_error(run_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run_cli("ui", "--web-port", str(port), "--out", str(run_dir), timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "in use" in result.stderr
