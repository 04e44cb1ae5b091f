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
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import (
    LOADLAB,
    REPO,
    REQUIRE_SERVICES,
    need_service,
    processes_mentioning,
    run_cli,
    unique,
    wait_until,
)
from tests.test_own_locustfile import EVENT_LISTENERS

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


def get_json(url: str, timeout: float = 15) -> dict:
    # generous: the UI's web server shares its gevent hub with the swarm's users, and a loaded 2-core machine (the
    # suite runs two files at a time) has kept it from answering within 5 s
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


SMOKE_CLASSES = ("Smoke_CeleryTaskUser", "Smoke_ApiTaskUser")


def start_ui(run_dir: Path, port: int, *args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.Popen:
    log = (run_dir / "ui-stdout.log").open("w")
    proc = subprocess.Popen([LOADLAB, "ui", "--web-port", str(port), "--out", str(run_dir), *args], cwd=cwd, env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    log.close()  # the child has its own descriptor
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: ui_ready(url) or proc.poll() is not None, 60, 0.2, "the web UI")
    assert proc.poll() is None, (run_dir / "ui-stdout.log").read_text()
    return proc


def stop_ui(proc: subprocess.Popen, run_dir: Path, stop_signal=signal.SIGINT) -> int:
    if proc.poll() is None:
        proc.send_signal(stop_signal)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def validate_report(path: Path) -> dict:
    import jsonschema

    from loadlab.reports.report import SCHEMA_PATH

    report = json.loads(path.read_text())
    jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()),
                                    format_checker=jsonschema.FormatChecker()).validate(report)
    return report


def wait_reported(url: str, swarm: int, timeout: float = 60) -> dict:
    """The tab's JSON once the swarm's drain is over and its report written (the window then says "reported")."""
    def reported():
        stats = get_json(f"{url}/celery/stats")
        window = stats["window"]
        return stats if window["swarm"] == swarm and window["state"] == "reported" else None
    return wait_until(reported, timeout, 0.2, f"the report of swarm {swarm}")


def locust_submissions(report_dir: Path, task: str | None = None) -> int:
    """Tasks Locust saw submitted in a swarm, from its own table as the report saved it (``locust/locust_stats.csv``;
    ``/stats/requests`` is memoized by Locust for ~2 s, so it can answer from before the stop): successful
    ``publish <task>`` requests (the Celery user) and ``POST /tasks/<task>`` (the API user; a 202 means published)
    — independent of loadlab's ledger.

    locust_gap: the two differ by at most one task per user at each boundary, either way. At a *reset*, a publish
    under way was sent before it (not in the ledger's window) and is answered after it (in Locust's table). At a
    *stop*, Locust kills the users that wait; one whose wake-up was already due runs on into its next task and the
    kill lands inside the publish: the broker has the task (it runs; the ledger counts it, from its SENT record or,
    without one, from its worker record), Locust never gets the request event."""
    import csv

    with (report_dir / "locust" / "locust_stats.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    names = (f"publish {task}", f"/tasks/{task}") if task else None
    return sum(int(r["Request Count"]) - int(r["Failure Count"]) for r in rows
               if ((r["Type"] == "celery" and r["Name"].startswith("publish "))
                   or (r["Type"] == "POST" and r["Name"].startswith("/tasks/")))
               and (names is None or r["Name"] in names))


def assert_ledger_adds_up(report: dict) -> None:
    """Every task of the swarm was followed to its end: drained, none lost, one end-to-end sample each."""
    t = report["tasks"]
    assert t["submitted"] > 0 and t["lost"] == 0 and report["drain"]["completed"], t
    assert t["submitted"] == t["succeeded"] + t["failed"] + t["revoked"] + t["rejected"] + t["lost"]
    assert report["latency_ms"]["end_to_end"]["count"] == t["succeeded"] + t["failed"]
    assert report["latency_ms"]["publish"]["count"] <= t["submitted"]


def assert_report_is_the_tabs(report: dict, stats: dict) -> None:
    """The report's ledger is the one the tab (its JSON) showed once the report was written, and it adds up."""
    assert_ledger_adds_up(report)
    for key in ("submitted", "succeeded", "failed", "revoked", "rejected"):
        assert report["tasks"][key] == stats["tasks"][key], (key, report["tasks"], stats["tasks"])
    assert stats["tasks"]["in_flight"] == 0
    assert report["tasks"]["retried"] == stats["retries"]["retried"]
    assert report["retries"]["tasks_retried"] == stats["retries"]["tasks_retried"]
    assert report["latency_ms"] == stats["latency_ms"]
    # the tab's per-task table is the report's latency_ms_by_task; per worker, the attempts add up to the ledger's
    assert {name: t["end_to_end_ms"] for name, t in stats["by_task"].items()} == report["latency_ms_extra"]["end_to_end_by_task"]
    assert sum(t["states"].get("SUCCESS", 0) for t in stats["by_task"].values()) == report["tasks"]["succeeded"]
    workers = stats["by_worker"].values()
    assert sum(w.get("SUCCESS", 0) for w in workers) == report["tasks"]["succeeded"]
    assert sum(w.get("RETRY", 0) for w in workers) == report["tasks"]["retried"]


def tab_charts(page) -> dict[str, dict[str, int]]:
    """The Celery tab's charts: title -> series -> points drawn."""
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('.loadlab-chart')].map(c => [
        c.dataset.title, Object.fromEntries([...c.querySelectorAll('polyline')].map(l => [
            l.dataset.series, l.getAttribute('points').trim() ? l.getAttribute('points').trim().split(' ').length : 0]))]))""")


def tab_table(page, key: str) -> dict[str, list[str]]:
    """A per-task or per-worker table of the tab: first column -> the other columns."""
    rows = page.evaluate(f"""() => [...document.querySelectorAll('table[data-table={key}] tr')].slice(1)
        .map(r => [...r.children].map(c => c.textContent))""")
    return {row[0]: row[1:] for row in rows}


def pick_smoke(page, users: int) -> None:
    """In the start form (the page's, or the "New" dialog's, the only one open): the smoke scenario's two classes
    only (the first row with a checkbox is the picker's select-all), ``users`` users started at once."""
    page.locator("tr", has=page.locator("input[type=checkbox]")).first.locator("input[type=checkbox]").uncheck()
    for name in SMOKE_CLASSES:
        page.locator("tr", has_text=name).locator("input[type=checkbox]").check()
    page.fill("input[name=userCount]", str(users))
    page.fill("input[name=spawnRate]", str(users))


def wait_tab(page, predicate, timeout_s: float, what: str):
    """Polls the Celery tab (the UI refreshes it every 2 s) until ``predicate(page)`` holds or the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate(page)
        if value:
            return value
        page.wait_for_timeout(250)
    pytest.fail(f"the Celery tab never showed {what}:\n{page.locator('table').last.inner_text()}")


def tab_int(page, metric: str) -> int | None:
    value = metric_value(page, metric)
    return int(value) if value.isdigit() else None


def show_stopped(page, url: str) -> None:
    """Locust's page polls its stats only while a test spawns or runs, so after a stop it can stay on what its last
    poll saw (even the runner's brief "cleanup" state, with no "New" button): once the runner says "stopped",
    reload it, as a user would, and go back to the Celery tab."""
    wait_until(lambda: get_json(f"{url}/stats/requests")["state"] == "stopped", 15, 0.2, "Locust to stop")
    page.reload()
    page.get_by_role("tab", name="Celery").click()


@pytest.mark.timeout(240)
def test_celery_tab_in_headless_chromium(run_dir):
    """Two swarms from the browser: the tab's counts restart on "Reset stats" and on a new swarm, and each stopped
    swarm gets a report (run_dir/swarm-NNN/) that validates, adds up, is what the tab showed, and matches what
    Locust saw submitted."""
    chromium = need_chromium()
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_ui(run_dir, port)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1100})
                page.goto(url)
                # every scenario is in the picker; the chosen one (smoke, the default) starts ticked alone
                page.wait_for_selector("tbody tr input[type=checkbox]", timeout=15_000)
                picker = page.locator("tbody tr", has=page.locator("input[type=checkbox]"))
                wait_until(lambda: {picker.nth(i).locator("td").nth(1).inner_text()
                                    for i in range(picker.count()) if picker.nth(i).locator("input").is_checked()}
                           == set(SMOKE_CLASSES), 10, 0.2, "the smoke classes ticked alone")
                assert picker.count() > len(SMOKE_CLASSES)
                pick_smoke(page, 4)
                page.get_by_role("button", name="Start").click()
                page.get_by_role("tab", name="Celery").click()
                page.wait_for_selector("td:has-text('Tasks succeeded')", timeout=15_000)

                # --- swarm 1 runs: the tab fills from the recorder
                wait_tab(page, lambda p: (tab_int(p, "Tasks succeeded") or 0) >= 20
                         and (tab_int(p, "Latency end to end") or 0) > 0, 25, "finished tasks")
                assert metric_value(page, "Workers up") == "1 / 1"
                assert metric_value(page, "Queue depth (celery)").isdigit()
                assert tab_int(page, "Tasks submitted") >= tab_int(page, "Tasks succeeded")
                assert metric_value(page, "Swarm") == "1"
                assert "(swarm start)" in metric_value(page, "Counted since")
                # the selection reached the server: only the smoke scenario's classes run
                tasks = get_json(f"{url}/tasks")
                assert set(tasks["per_class"]) == set(SMOKE_CLASSES)
                # live charts: throughput by state, queue ready + unacked, end-to-end p50/p95, over time
                charts = wait_tab(page, lambda p: (c := tab_charts(p)) and min(
                    c.get("Throughput by state", {}).get("succeeded", 0), c.get("Queue depth", {}).get("ready", 0),
                    c.get("End-to-end latency", {}).get("p95", 0)) >= 3 and c, 20, "charts with points")
                assert set(charts) == {"Throughput by state", "Queue depth", "End-to-end latency",
                                       "Queue wait and execution"}
                assert min(charts["Queue wait and execution"].values()) >= 1
                assert set(charts["Queue depth"]) == {"ready", "unacked"}
                # one time axis for all four (the queue sampler's points and the series' buckets end apart)
                spans = page.evaluate("() => [...document.querySelectorAll('.loadlab-chart')].map(c => c.dataset.span)")
                assert len(spans) == 4 and None not in spans and len(set(spans)) == 1, spans
                live = get_json(f"{url}/celery/stats")
                assert set(tab_table(page, "by_task")) <= set(live["by_task"]) and tab_table(page, "by_task")
                assert set(tab_table(page, "by_worker")) == set(live["by_worker"]) and len(live["by_worker"]) == 1
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                shot = ARTIFACTS / "webui-celery-tab.png"
                page.screenshot(path=str(shot), full_page=True)
                print(f"\nscreenshot of the Celery tab (swarm 1 running): {shot}")

                # --- "Reset stats" while it runs: the counts restart; tasks sent before are not counted after
                before = get_json(f"{url}/celery/stats")
                assert before["tasks"]["submitted"] >= 20
                with page.expect_response(lambda r: r.url.endswith("/stats/reset")):
                    reset_at = time.time()
                    page.get_by_role("button", name="Reset").click()
                after = get_json(f"{url}/celery/stats")
                assert after["window"]["counted_from"] == "reset_stats" and after["window"]["swarm"] == 1
                assert reset_at - 1 <= after["since"] <= time.time()
                assert after["tasks"]["submitted"] < before["tasks"]["submitted"] // 2, after["tasks"]
                assert after["latency_ms"]["end_to_end"]["count"] < before["latency_ms"]["end_to_end"]["count"]
                wait_tab(page, lambda p: "(Reset stats)" in metric_value(p, "Counted since")
                         and (tab_int(p, "Tasks succeeded") or 0) >= 10, 20, "counts from the reset")

                # --- stop swarm 1: drained, report written, the tab shows it and where it is
                page.get_by_role("button", name="Stop").click()
                stats1 = wait_reported(url, 1)
                report1 = validate_report(run_dir / "swarm-001" / "report.json")
                assert_report_is_the_tabs(report1, stats1)
                assert report1["scenario"] == "smoke" and report1["ui"]["counted_from"] == "Reset stats"
                assert report1["started_at"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(after["since"]))
                # Locust's own table restarted at the same reset (see locust_submissions for the bound)
                locust1 = locust_submissions(run_dir / "swarm-001")
                assert abs(locust1 - report1["tasks"]["submitted"]) <= 4, report1["ui"]
                for name in ("report.html", "summary.md", "locust/locust_stats.csv"):
                    assert (run_dir / "swarm-001" / name).is_file(), name
                show_stopped(page, url)
                wait_tab(page, lambda p: "swarm-001/report.html" in metric_value(p, "Report"), 10, "the report path")
                assert tab_int(page, "Tasks submitted") == report1["tasks"]["submitted"]
                # the tab's per-task table after the drain: the report's samples per task
                wait_tab(page, lambda p: {name: int(cols[-1]) for name, cols in tab_table(p, "by_task").items()} == {
                    name: lat["count"] for name, lat in report1["latency_ms_extra"]["end_to_end_by_task"].items()}, 10,
                    "the per-task table of the report")
                shot = ARTIFACTS / "webui-celery-tab-stopped.png"
                page.screenshot(path=str(shot), full_page=True)
                print(f"screenshot of the Celery tab (swarm 1 stopped, report written): {shot}")

                # --- "Reset stats" while stopped: an empty window, the written report untouched
                page.get_by_role("button", name="Reset").click()
                wait_tab(page, lambda p: tab_int(p, "Tasks submitted") == 0 and tab_int(p, "Tasks succeeded") == 0
                         and tab_int(p, "Latency end to end") == 0 and metric_value(p, "Swarm") == "none running",
                         10, "zero counts after the reset")
                assert json.loads((run_dir / "swarm-001" / "report.json").read_text()) == report1

                # --- a new swarm: counted from its own start
                page.get_by_role("button", name="New").click()
                page.get_by_text("Start new load test").wait_for()
                pick_smoke(page, 2)
                started_at = time.time()
                page.get_by_role("button", name="Start").click()
                page.get_by_role("tab", name="Celery").click()
                wait_tab(page, lambda p: metric_value(p, "Swarm") == "2" and "(swarm start)" in metric_value(
                    p, "Counted since") and (tab_int(p, "Tasks succeeded") or 0) >= 10, 25, "swarm 2's tasks")
                window = get_json(f"{url}/celery/stats")["window"]
                assert window["counted_from"] == "test_start" and window["started_at"] >= started_at - 1
                page.get_by_role("button", name="Stop").click()
                stats2 = wait_reported(url, 2)
                report2 = validate_report(run_dir / "swarm-002" / "report.json")
                assert_report_is_the_tabs(report2, stats2)
                assert report2["ui"]["counted_from"] == "the start of the swarm"
                # its window and Locust's table start at the same test_start: only the stop can make them differ
                locust2 = locust_submissions(run_dir / "swarm-002")
                assert 0 <= report2["tasks"]["submitted"] - locust2 <= 2, report2["ui"]
                show_stopped(page, url)
                wait_tab(page, lambda p: "swarm-002/report.html" in metric_value(p, "Report"), 10, "the report path")
                assert tab_int(page, "Tasks submitted") == report2["tasks"]["submitted"]
            finally:
                browser.close()
    finally:
        code = stop_ui(proc, run_dir)
    output = (run_dir / "ui-stdout.log").read_text()
    assert code == 0, output
    wait_until(lambda: not processes_mentioning(str(run_dir)), 15, 0.2, "every process of the stack to exit")
    assert (run_dir / "settings.json").is_file() and (run_dir / "logs").is_dir()
    # the terminal said where each report is (on one line, whatever its width); quitting with no swarm running
    # adds none
    for n in (1, 2):
        assert f"report: {run_dir / f'swarm-{n:03d}' / 'report.html'}\n" in output, output
    assert sorted(p.name for p in run_dir.glob("swarm-*")) == ["swarm-001", "swarm-002"]


def post_form(url: str, path: str, form: dict | None = None) -> dict | str:
    request = urllib.request.Request(f"{url}{path}", method="POST",
                                     data=urllib.parse.urlencode(form or {}, doseq=True).encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read().decode()
    return json.loads(body) if body.startswith("{") else body


@pytest.mark.timeout(150)
def test_new_swarm_while_the_last_drains_then_quit(run_dir):
    """Over HTTP (the form's endpoints): a retry-storm swarm is stopped and a smoke swarm started at once, while the
    first one's tasks still wait for their retries. Each window keeps its own tasks: the first drains to a report
    with every task accounted for while the second runs; SIGTERM then stops the second, which gets its report too
    before the stack stops."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_ui(run_dir, port)
    try:
        assert post_form(url, "/swarm", {"user_count": 3, "spawn_rate": 3, "host": "",
                                         "user_classes": ["RetryStorm_CeleryTaskUser"]})["success"]
        wait_until(lambda: get_json(f"{url}/celery/stats")["retries"]["retried"] >= 5, 25, 0.2, "retries")
        post_form(url, "/stop")  # returns once Locust's users have stopped: test_stop has fired
        assert post_form(url, "/swarm", {"user_count": 3, "spawn_rate": 3, "host": "",
                                         "user_classes": list(SMOKE_CLASSES)})["success"]
        stats = get_json(f"{url}/celery/stats")
        window = stats["window"]
        assert window["swarm"] == 2 and window["counted_from"] == "test_start", window
        (draining,) = window["earlier_swarms_draining"]
        assert draining["swarm"] == 1, window
        print(f"\nswarm 1 still had {draining['in_flight']} tasks in flight when swarm 2 started")
        assert stats["tasks"]["submitted"] <= 3, stats["tasks"]  # swarm 2's first publishes at most
        report1 = validate_report(wait_until(lambda: (path := run_dir / "swarm-001" / "report.json").is_file()
                                             and path, 45, 0.2, "the report of swarm 1"))
        wait_until(lambda: get_json(f"{url}/celery/stats")["tasks"]["succeeded"] >= 15, 25, 0.2, "swarm 2's tasks")
    finally:
        code = stop_ui(proc, run_dir, signal.SIGTERM)
    output = (run_dir / "ui-stdout.log").read_text()
    assert code in (0, 128 + signal.SIGTERM), output

    # swarm 1: every task, retried ones included, followed to its end in its own window
    assert_ledger_adds_up(report1)
    assert report1["scenario"] == "retry-storm" and report1["tasks"]["retried"] > 0
    assert set(report1["latency_ms_extra"]["end_to_end_by_task"]) == {"flaky"}
    assert 0 <= report1["tasks"]["submitted"] - locust_submissions(run_dir / "swarm-001") <= 3, report1["ui"]
    # swarm 2 (stopped by SIGTERM): none of swarm 1's tasks, not even those that finished during it
    report2 = validate_report(run_dir / "swarm-002" / "report.json")
    assert_ledger_adds_up(report2)
    assert report2["scenario"] == "smoke" and report2["tasks"]["submitted"] >= 15
    assert 0 <= report2["tasks"]["submitted"] - locust_submissions(run_dir / "swarm-002") <= 3, report2["ui"]
    flaky2 = report2["latency_ms_extra"]["end_to_end_by_task"].get("flaky", {"count": 0})["count"]
    assert flaky2 <= locust_submissions(run_dir / "swarm-002", task="flaky") + 3
    for n in (1, 2):
        assert (run_dir / f"swarm-{n:03d}" / "report.html").is_file()
        assert f"report: {run_dir / f'swarm-{n:03d}' / 'report.html'}\n" in output, output
    wait_until(lambda: not processes_mentioning(str(run_dir)), 15, 0.2, "every process of the stack to exit")


ORDERS_TASKS = ("orders_api.tasks.checkout", "orders_api.tasks.charge_payment", "orders_api.tasks.reserve_stock")


def page_template_args(url: str) -> dict:
    """The template arguments Locust's page is served with (``window.templateArgs``): what its form offers."""
    with urllib.request.urlopen(url, timeout=15) as response:
        page = response.read().decode()
    start = page.index("window.templateArgs = ") + len("window.templateArgs = ")
    return json.JSONDecoder().raw_decode(page[start:])[0]


SHAPE_OF_ITS_OWN = '''

from locust import LoadTestShape


class RampOfItsOwn(LoadTestShape):
    def tick(self):
        return (2, 2) if self.get_run_time() < 5 else None
'''


@pytest.mark.timeout(180)
def test_ui_runs_your_own_locustfile(tmp_path, run_dir):
    """``loadlab ui --app orders_api.celery:app --locustfile locustfile.py`` from a copy of examples/fastapi_orders,
    driven over HTTP: the form offers the file's user class alone, ticked, and its load shape; a swarm of it publishes the app's tasks;
    its report counts them by their names, adds up and loses none; the file's listeners are told init (with the web
    UI), test_start, test_stop and, on Ctrl-C, quitting, each once."""
    project = tmp_path / "fastapi_orders"
    shutil.copytree(REPO / "examples" / "fastapi_orders", project, ignore=shutil.ignore_patterns("__pycache__"))
    locustfile = project / "locustfile.py"
    locustfile.write_text(locustfile.read_text() + EVENT_LISTENERS + SHAPE_OF_ITS_OWN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOADLAB_") and k != "PYTHONPATH"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_ui(run_dir, port, "--app", "orders_api.celery:app", "--locustfile", "locustfile.py", cwd=project,
                    env=env)
    try:
        args = page_template_args(url)
        assert args["available_user_classes"] == ["Customer"], args["available_user_classes"]
        assert args["loadlab_selected_user_classes"] == ["Customer"]
        assert "RampOfItsOwn" in args["available_shape_classes"], args["available_shape_classes"]
        assert set(get_json(f"{url}/tasks")["per_class"]) == {"Customer"}
        assert post_form(url, "/swarm", {"user_count": 4, "spawn_rate": 4, "host": "",
                                         "user_classes": ["Customer"]})["success"]
        stats = wait_until(lambda: (s := get_json(f"{url}/celery/stats"))["tasks"]["succeeded"] >= 30 and s, 40, 0.2,
                           "the locustfile's tasks to finish")
        assert set(ORDERS_TASKS) <= set(stats["by_task"]), stats["by_task"]
        post_form(url, "/stop")
        stats = wait_reported(url, 1, timeout=90)
        report = validate_report(run_dir / "swarm-001" / "report.json")
        assert_report_is_the_tabs(report, stats)
        assert report["tasks"]["lost"] == 0 and report["ui"]["user_classes"] == ["Customer"]
        assert report["scenario"] == "locustfile:locustfile.py"
        assert set(ORDERS_TASKS) <= set(report["latency_ms_extra"]["end_to_end_by_task"])
        requests = {row["name"]: row for row in report["locust"]["by_request"]}
        for name in ORDERS_TASKS:
            assert requests[f"publish {name}"]["requests"] > 0 and requests[f"publish {name}"]["failures"] == 0
        assert report["locust"]["request_failures"] == 0
        # the ledger counts at least what the users published: a checkout's chain steps come on top
        assert report["tasks"]["submitted"] >= locust_submissions(run_dir / "swarm-001") > 0, report["ui"]
    finally:
        code = stop_ui(proc, run_dir)
    output = (run_dir / "ui-stdout.log").read_text()
    assert code == 0, output
    assert f"report: {run_dir / 'swarm-001' / 'report.html'}\n" in output, output
    assert (project / "events.log").read_text().splitlines() == [
        "init LocalRunner web_ui=True", "test_start Customer", "test_stop", "quitting"]
    wait_until(lambda: not processes_mentioning(str(run_dir)), 15, 0.2, "every process of the stack to exit")


# Importing Locust monkey-patches the importing process with gevent, so the endpoint is exercised in a process of its
# own (patched first, like `loadlab ui`), which prints what the endpoint and the recorder say.
ENDPOINT_SCRIPT = textwrap.dedent("""
    from gevent import monkey; monkey.patch_all()
    import json, sys
    from pathlib import Path
    sys.argv[1:] = []  # Locust's web UI parses sys.argv for its form's extra options
    from loadlab.loadtests.api import celery_client
    from loadlab.loadtests.webui import CeleryMonitor, install_celery_tab, ui_environment
    from loadlab.reports.recorder import REPORT_PHASES, Recorder, histogram_stats_ms
    from loadlab.config.settings import Settings
    from loadlab.stack.supervisor import Stack

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


LATE_RECORD_SCRIPT = textwrap.dedent("""
    from gevent import monkey; monkey.patch_all()
    import json, sys, time
    sys.argv[1:] = []
    import msgpack, redis
    from loadlab.loadtests.webui import SwarmWindows, ui_environment
    from loadlab.exporters import ledger
    from loadlab.config.settings import Settings

    settings = Settings.build(run_id=__RUN_ID__, ledger_url="redis://127.0.0.1:6379/14")
    client = redis.Redis.from_url(settings.ledger_url)
    key = ledger.channel_key(settings.run_id)
    now = time.time()

    def push(*record):
        client.rpush(key, msgpack.packb(list(record), use_bin_type=True))

    def attempt(state, started_at):
        # [ATTEMPT, id, name, state, sent_at, attempt_sent_at, eta, started_at, body_done_at, finished_at, retries,
        #  exception type, intended_at, hostname]
        return (ledger.ATTEMPT, "t1", "loadlab.flaky", state, now + 1, now + 1, None, started_at, started_at + 0.001,
                started_at + 0.002, 0, None, None, "w1")

    try:
        windows = SwarmWindows(settings, __RUN_DIR__, ui_environment(settings))
        windows.on_test_start()
        push(ledger.SENT, "t1", "loadlab.flaky", now + 1, 0.001, None)
        push(*attempt("SUCCESS", now + 1.2))  # the second attempt's record came first
        recorder = windows.recorder
        recorder.close()  # drained: its report is written from this
        before = recorder.summary()["latency_ms"]["queue_wait"]["count"]
        push(*attempt("RETRY", now + 1.1))  # the first attempt's record, after the report
        windows.poll()
        print("RESULT " + json.dumps({"before": before, "after": recorder.summary()["latency_ms"]["queue_wait"]["count"],
                                      "dropped": windows.dropped}))
    finally:
        client.delete(key)
""")


def test_a_record_that_comes_after_a_windows_report_leaves_the_tab_as_the_report_says(run_dir):
    need_service("Redis", "127.0.0.1", 6379)
    script = LATE_RECORD_SCRIPT.replace("__RUN_ID__", repr(unique())).replace("__RUN_DIR__", repr(str(run_dir)))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    assert result == {"before": 1, "after": 1, "dropped": 1}


def test_busy_web_port_is_a_usage_error(run_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run_cli("ui", "--web-port", str(port), "--out", str(run_dir), timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "in use" in result.stderr


def test_the_tab_shows_workflows_and_the_tasks_that_tasks_published():
    """A chain (root -> step -> step) and a spawn (root -> one leaf) through the recorder: the tab's table gets the
    children and the workflows, over all and per root task, first publish to last result."""
    from loadlab.exporters import ledger
    from loadlab.loadtests.celery_tab import celery_stats, table_rows
    from loadlab.reports.recorder import Recorder

    r = Recorder("redis://127.0.0.1:1/0", "tab")  # records are handed in directly
    flows = {"chain": ("app.start_chain", 100.0, ["c1", "c2"], 0.5), "spawn": ("app.spawn", 101.0, ["k"], 0.1)}
    for root, (name, sent, children, step_s) in flows.items():
        r.handle([ledger.SENT, root, name, sent, 0.001, None])
        # as Celery does: a task publishes the next one while it runs, before its own result is stored
        tasks = [(root, name, sent, sent + 0.01, None)]
        for child in children:
            tasks.append((child, "app.step", tasks[-1][3], tasks[-1][3] + step_s, tasks[-1][0]))
        for (task_id, task_name, at, done, parent), following in zip(tasks, tasks[1:] + [None]):
            if following is not None:
                r.handle([ledger.SENT, following[0], "app.step", following[2], 0.001, None, task_id, root])
            lineage = [parent, root] if parent else []
            r.handle([ledger.ATTEMPT, task_id, task_name, "SUCCESS", at, at, None, at, done, done, 0, None, None, "w1",
                      *lineage])
    stats = celery_stats(r, None, 100.0)
    assert stats["tasks"]["children"] == 3 and stats["workflows"]["count"] == 2
    rows = {row["metric"]: row for row in table_rows(stats)}
    assert rows["Tasks published by tasks"]["value"] == 3
    whole = rows["Workflows finished, first publish to last result"]
    assert whole["value"] == 2 and whole["max"] == pytest.approx(1010, rel=0.01)  # the chain: 10 ms + 2 x 500 ms
    assert rows["Workflows finished, first publish to last result (app.spawn)"]["p50"] == pytest.approx(110, rel=0.01)
    assert rows["Workflows finished, first publish to last result (app.start_chain)"]["value"] == 1

