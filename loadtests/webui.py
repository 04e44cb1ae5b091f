"""The Locust web UI of ``loadlab ui``, with a **Celery** tab.

The tab uses Locust's extended-tabs mechanism: ``extended_tabs`` / ``extended_tables`` / ``extended_csv_files`` in
the web UI's template arguments, and an ``extended_stats`` entry added to the ``/stats/requests`` answer the React UI
polls every two seconds. The same numbers are served as JSON on ``/celery/stats`` (and as CSV on
``/celery/stats/csv``).

What the tab shows, and where it comes from:

* queue depth (and unacked messages on Redis) — read from the broker by ``exporters.exporter_service.BrokerPoller``
  (Redis: LLEN of the queue and its priority sub-lists; RabbitMQ: a passive ``queue_declare``);
* workers up — a Celery control ``ping`` with a short timeout;
* tasks by state, retries, and the publish / queue_wait / execution / end_to_end percentiles — loadlab's run
  recorder (its ledger counts and HDR histograms, not Locust's rounded buckets).

Broker reads and pings run in background greenlets that cache their last answer; a request only formats what is
cached, so a slow broker never stalls the UI. The recorder's numbers cover everything since the UI process started
(Locust resets its own table at every new test; the recorder follows tasks across tests, so it does not).
"""
from __future__ import annotations

import csv
import io
import json
import socket
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import gevent
from locust import LoadTestShape, User
from locust.env import Environment
from locust.event import Events

from loadtests.runner import STOP_TIMEOUT_S, completion_listener
from loadtests.scenarios import SCENARIOS, Scenario, get_scenario
from loadtests.users import build_user_classes
from reports.recorder import REPORT_PHASES, histogram_stats_ms
from stack.settings import Settings

TAB_KEY = "celery"
STATS_ROUTE = "/celery/stats"
CSV_ROUTE = "/celery/stats/csv"
QUEUE_INTERVAL_S = 1.0
PING_INTERVAL_S = 2.0
PING_TIMEOUT_S = 1.0
TABLE_STRUCTURE = [
    {"key": "metric", "title": "Celery"},
    {"key": "value", "title": "Value"},
    {"key": "p50", "title": "p50 (ms)"},
    {"key": "p95", "title": "p95 (ms)"},
    {"key": "p99", "title": "p99 (ms)"},
    {"key": "max", "title": "max (ms)"},
]
PHASE_LABELS = {"publish": "publish", "queue_wait": "queue wait", "execution": "execution",
                "end_to_end": "end to end"}
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# --- scenarios as pickable user classes and shapes ----------------------------------------------------------------
def _prefix(scenario: Scenario) -> str:
    return "".join(part.title() for part in scenario.name.replace("_", "-").split("-"))


def scenario_user_classes(settings: Settings, scenarios: dict[str, Scenario] | None = None) -> dict[str, type[User]]:
    """Every scenario's user classes, renamed ``<Scenario>_<Class>`` (``Smoke_CeleryTaskUser``) so the web UI's
    class picker can tell them apart."""
    classes: dict[str, type[User]] = {}
    for scenario in (scenarios or SCENARIOS).values():
        for base in build_user_classes(settings, scenario):
            name = f"{_prefix(scenario)}_{base.__name__}"
            classes[name] = type(name, (base,), {"__module__": base.__module__, "__qualname__": name})
    return classes


def scenario_shape_classes(settings: Settings) -> dict[str, LoadTestShape]:
    """A shape instance for each scenario that has one (``step``, ``spike``, …), scaled to its users and duration."""
    shapes: dict[str, LoadTestShape] = {}
    for scenario in SCENARIOS.values():
        shape_name = getattr(scenario, "shape", None)
        if not shape_name:
            continue
        from loadtests.shapes import shape_for

        shape = shape_for(shape_name, settings.users or scenario.users, settings.duration or scenario.duration_s,
                          settings.spawn_rate or scenario.spawn_rate)
        shapes[f"{_prefix(scenario)}Shape"] = shape
    return shapes


def ui_environment(settings: Settings, csv_prefix: str | None = None) -> Environment:
    """A Locust environment whose class picker offers every scenario; the form starts at the chosen scenario's
    users and spawn rate."""
    from locust.argument_parser import get_parser

    scenario = get_scenario(settings.scenario)
    available = scenario_user_classes(settings)
    prefix = _prefix(scenario) + "_"
    default_classes = [cls for name, cls in available.items() if name.startswith(prefix)]
    args = ["--users", str(settings.users or scenario.users),
            "--spawn-rate", f"{settings.spawn_rate or scenario.spawn_rate:g}", "--class-picker"]
    if settings.duration:
        args += ["--run-time", f"{int(settings.duration)}s"]
    if csv_prefix:
        args += ["--csv", csv_prefix, "--csv-full-history"]
    options = get_parser(default_config_files=[]).parse_args(args)
    return Environment(user_classes=default_classes, events=Events(), host=settings.api_url,
                       stop_timeout=STOP_TIMEOUT_S, parsed_options=options, locustfile="loadlab ui",
                       available_user_classes=available, available_shape_classes=scenario_shape_classes(settings),
                       available_user_tasks={name: cls.tasks for name, cls in available.items()})


# --- broker and worker state, polled in the background --------------------------------------------------------------
class CeleryMonitor:
    """Caches queue depth and worker pings, refreshed by two greenlets (``start``) or on demand (``refresh_*``)."""

    def __init__(self, settings: Settings, *, expected_workers: int | None = None,
                 queue_interval_s: float = QUEUE_INTERVAL_S, ping_interval_s: float = PING_INTERVAL_S,
                 ping_timeout_s: float = PING_TIMEOUT_S):
        from stack.app import make_app

        self.settings = settings
        self.queue = settings.queue
        self.expected_workers = expected_workers
        self.queue_interval_s = queue_interval_s
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        # no ledger hooks: the monitor publishes control messages only
        self.app = make_app(settings.model_copy(update={"ledger_url": None}))
        self._poller = None
        self.queue_state: dict = {"depth": None, "unacked": None, "error": None, "at": None}
        self.worker_state: dict = {"up": None, "names": [], "error": None, "at": None}
        self._greenlets: list[gevent.Greenlet] = []

    def start(self) -> "CeleryMonitor":
        self._greenlets = [gevent.spawn(self._every, self.queue_interval_s, self.refresh_queue),
                           gevent.spawn(self._every, self.ping_interval_s, self.refresh_workers)]
        return self

    def stop(self) -> None:
        gevent.killall(self._greenlets, timeout=5)
        self._greenlets = []
        if self._poller is not None:
            self._poller.reset()
        try:
            self.app.close()
        except Exception:  # noqa: BLE001
            pass

    @staticmethod
    def _every(interval_s: float, refresh: Callable[[], None]) -> None:
        while True:
            started = time.monotonic()
            refresh()
            gevent.sleep(max(0.05, interval_s - (time.monotonic() - started)))

    def refresh_queue(self) -> None:
        from exporters.exporter_service import BrokerPoller

        if self._poller is None:
            self._poller = BrokerPoller(self.app, [self.queue])
        try:
            polled = self._poller.poll()
        except Exception as exc:  # noqa: BLE001 - shown in the tab; the next round reconnects
            self._poller.reset()
            self.queue_state = {**self.queue_state, "error": _one_line(exc), "at": time.time()}
            return
        unacked = polled.get("unacked") or {}
        self.queue_state = {"depth": int(polled["length"].get(self.queue, 0)),
                            "unacked": sum(unacked.values()) if unacked else None, "error": None, "at": time.time()}

    def refresh_workers(self) -> None:
        try:
            replies = self.app.control.ping(timeout=self.ping_timeout_s) or []
        except Exception as exc:  # noqa: BLE001
            self.worker_state = {**self.worker_state, "error": _one_line(exc), "at": time.time()}
            return
        names = sorted({name for reply in replies for name in reply})
        self.worker_state = {"up": len(names), "names": names, "error": None, "at": time.time()}

    def snapshot(self) -> dict:
        return {"queue": {"name": self.queue, **self.queue_state},
                "workers": {"expected": self.expected_workers, **self.worker_state}}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


# --- the tab ------------------------------------------------------------------------------------------------------
def celery_stats(recorder, monitor: CeleryMonitor | None, since: float) -> dict:
    """The JSON the tab shows: broker and worker state from the monitor's cache, task counts and phase latency
    percentiles from the recorder."""
    out: dict = {"since": since, "at": time.time()}
    out.update(monitor.snapshot() if monitor is not None else {"queue": None, "workers": None})
    if recorder is None:
        out.update({"tasks": None, "retries": None, "latency_ms": None})
        return out
    with getattr(recorder, "_lock", None) or nullcontext():
        c = recorder.counts
        out["tasks"] = {"submitted": c["submitted"], "succeeded": c["succeeded"], "failed": c["failed"],
                        "revoked": c["revoked"], "rejected": c["rejected"], "in_flight": recorder.outstanding}
        out["retries"] = {"retried": c["retried"], "tasks_retried": recorder.tasks_retried,
                          "exhausted": recorder.exhausted}
        out["latency_ms"] = {phase: histogram_stats_ms(recorder.histograms[phase]) for phase in REPORT_PHASES}
    return out


def table_rows(stats: dict) -> list[dict]:
    rows: list[dict] = []

    # no "name" key: the UI sorts rows by "name" unless a column header is clicked, and this order is meant
    def row(metric, value="", p50="", p95="", p99="", maximum=""):
        rows.append({"metric": metric, "value": value, "p50": p50, "p95": p95, "p99": p99, "max": maximum})

    workers = stats.get("workers")
    if workers is not None:
        up = workers["up"]
        value = up if workers["expected"] is None or up is None else f"{up} / {workers['expected']}"
        row("Workers up", _or_error(value, workers["error"]))
    queue = stats.get("queue")
    if queue is not None:
        row(f"Queue depth ({queue['name']})", _or_error(queue["depth"], queue["error"]))
        if queue.get("unacked") is not None:
            row("Unacked (delivered, not acknowledged)", queue["unacked"])
    tasks = stats.get("tasks")
    if tasks is not None:
        for key in ("submitted", "succeeded", "failed", "in_flight", "revoked", "rejected"):
            row(f"Tasks {key.replace('_', ' ')}", tasks[key])
        r = stats["retries"]
        row("Retries (attempts retried)", r["retried"])
        row("Tasks that retried", r["tasks_retried"])
        row("Retries exhausted", r["exhausted"])
        for phase, lat in stats["latency_ms"].items():
            label = f"Latency {PHASE_LABELS.get(phase, phase)} (samples)"
            if lat["count"]:
                row(label, lat["count"], *(round(lat[k], 1) for k in ("p50", "p95", "p99", "max")))
            else:
                row(label, 0)
    if stats.get("since"):
        # Locust's own tables restart with every test; the recorder counts everything since the UI started
        row("Counted since (UTC)", time.strftime("%H:%M:%S", time.gmtime(stats["since"])))
    return rows


def _or_error(value, error):
    if error:
        return f"unavailable ({error})"
    return "…" if value is None else value


def install_celery_tab(environment: Environment, recorder: Callable[[], object | None],
                       monitor: CeleryMonitor | None, since: float | None = None) -> None:
    """Adds the Celery tab, its JSON and CSV routes, and the ``extended_stats`` of ``/stats/requests``."""
    from flask import Response, jsonify, request

    web_ui = environment.web_ui
    since = since or time.time()

    def current() -> dict:
        return celery_stats(recorder(), monitor, since)

    web_ui.template_args["extended_tabs"] = [{"title": "Celery", "key": TAB_KEY}]
    web_ui.template_args["extended_tables"] = [{"key": TAB_KEY, "structure": TABLE_STRUCTURE}]
    web_ui.template_args["extended_csv_files"] = [{"href": "." + CSV_ROUTE, "title": "Download Celery stats CSV"}]

    @web_ui.app.route(STATS_ROUTE)
    @web_ui.auth_required_if_enabled
    def celery_stats_json():
        return jsonify(current())

    @web_ui.app.route(CSV_ROUTE)
    @web_ui.auth_required_if_enabled
    def celery_stats_csv():
        data = io.StringIO()
        writer = csv.writer(data)
        writer.writerow([c["title"] for c in TABLE_STRUCTURE])
        for r in table_rows(current()):
            writer.writerow([r[c["key"]] for c in TABLE_STRUCTURE])
        return Response(data.getvalue(), mimetype="text/csv",
                        headers={"Content-Disposition": "attachment;filename=loadlab_celery_stats.csv"})

    @web_ui.app.after_request
    def add_celery_stats(response):
        if request.path != "/stats/requests" or response.status_code != 200 or not response.is_json:
            return response
        body = response.get_json()
        body["extended_stats"] = [{"key": TAB_KEY, "data": table_rows(current())}]
        response.set_data(json.dumps(body))
        return response


# --- ``loadlab ui`` ------------------------------------------------------------------------------------------------
def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def serve(settings: Settings, run_dir: Path, web_port: int, console) -> int:
    """Stack up, web UI on 127.0.0.1:web_port with the Celery tab; blocks until Ctrl-C/SIGTERM, then stops the load,
    closes the recorder and stops every process of the stack."""
    from locust.stats import StatsCSVFileWriter, stats_history

    from reports.recorder import Recorder
    from reports.report import write_json
    from stack.supervisor import StartupError, Stack

    # Locust's web UI parses sys.argv with its own parser on every page load (the "custom parameters" of its
    # form): loadlab's flags would make that parser exit, so the process shows it no arguments.
    sys.argv[1:] = []
    settings = settings.model_copy(update={"run_id": run_dir.name.replace(".", "-"), "run_dir": str(run_dir)})
    try:
        with console.status("starting the stack (broker, workers, producer API)…"):
            stack = Stack(settings, run_dir).__enter__()
    except StartupError as exc:
        console.print(f"[bold red]error:[/] the stack did not start: {exc}")
        return EXIT_FAILED
    runner = web_ui = recorder = monitor = writer = None
    greenlets: list[gevent.Greenlet] = []
    try:
        s = stack.settings
        write_json(run_dir / "settings.json", s.masked())
        (run_dir / "locust").mkdir(parents=True, exist_ok=True)
        csv_prefix = str(run_dir / "locust" / "locust")
        env = ui_environment(s, csv_prefix=csv_prefix)
        runner = env.create_local_runner()
        recorder = Recorder(s.ledger_url, s.run_id, max_retries=s.retry_max_retries,
                            on_completion=completion_listener(env)).start()
        monitor = CeleryMonitor(s, expected_workers=s.workers).start()
        writer = StatsCSVFileWriter(env, [0.5, 0.9, 0.95, 0.99, 1.0], csv_prefix, full_history=True)
        web_ui = env.create_web_ui("127.0.0.1", web_port, delayed_start=True, userclass_picker_is_active=True,
                                   stats_csv_writer=writer)
        install_celery_tab(env, lambda: recorder, monitor)
        web_ui.start()
        greenlets = [gevent.spawn(stats_history, runner), gevent.spawn(writer.stats_writer)]
        url = f"http://127.0.0.1:{web_port}"
        console.print(f"[green]Locust web UI[/] {url}  (Celery tab after you start a test; JSON {url}{STATS_ROUTE})")
        console.print(f"producer API {s.api_url}   logs {run_dir / 'logs'}   Ctrl-C stops everything.")
        while True:
            for child in stack.children():
                if not child.running():
                    console.print(f"[bold red]{child.name} exited[/] (code {child.popen.returncode}); "
                                  f"last lines of {child.log_path}:\n{child.log_tail()}")
                    return EXIT_FAILED
            if web_ui.greenlet is not None and web_ui.greenlet.dead:
                console.print(f"[bold red]error:[/] the web UI stopped: {web_ui.greenlet.exception}")
                return EXIT_FAILED
            gevent.sleep(0.5)
    except KeyboardInterrupt:
        console.print("stopping…")
        return EXIT_OK
    finally:
        if runner is not None:
            runner.quit()
        if web_ui is not None and web_ui.server is not None:
            web_ui.stop()
        gevent.killall(greenlets, timeout=5)
        if writer is not None:
            writer.close_files()
        if monitor is not None:
            monitor.stop()
        if recorder is not None:
            recorder.close()
        with console.status("stopping the stack…"):
            stack.stop()
