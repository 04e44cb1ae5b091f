"""The Locust web UI of ``loadlab ui``, with a **Celery** tab, and a report for every swarm.

The tab uses Locust's extended-tabs mechanism: ``extended_tabs`` / ``extended_tables`` / ``extended_csv_files`` in
the web UI's template arguments, and an ``extended_stats`` entry added to the ``/stats/requests`` answer the React UI
polls every two seconds. The same numbers are served as JSON on ``/celery/stats`` (and as CSV on
``/celery/stats/csv``).

What the tab shows, and where it comes from:

* queue depth (and unacked messages on Redis) — read from the broker by ``loadlab.exporters.exporter_service.BrokerPoller``
  (Redis: LLEN of the queue and its priority sub-lists; RabbitMQ: a passive ``queue_declare``);
* workers up — a Celery control ``ping`` with a short timeout;
* tasks by state, retries, and the publish / queue_wait / execution / end_to_end percentiles — loadlab's run
  recorder (its ledger counts and HDR histograms, not Locust's rounded buckets).

Above the table, ``webui_assets/celery_charts.js`` (served on ``/celery/charts.js`` and added to Locust's page) draws
live charts from ``/celery/stats`` every two seconds — throughput by state, queue depth ready and unacked, end-to-end
p50/p95, queue wait and execution p50/p95, over time (the recorder's per-second series, the monitor's recent queue polls) — and tables per task name
(final states, end-to-end percentiles: the report's ``latency_ms_extra.end_to_end_by_task``) and per worker (the
attempts each finished). It keeps polling after a stop, when Locust's own page no longer does.

Broker reads and pings run in background greenlets that cache their last answer; a request only formats what is
cached, so a slow broker never stalls the UI.

**Windows.** Like Locust's own tables, the recorder numbers restart with every test: a new swarm (Locust's
``test_start`` event) and the *Reset stats* button (``reset_stats``) each open a new, empty *window*
(``SwarmWindows``), and the tab shows the newest one. One consumer pops the run's ledger and hands every record to
the window its task belongs to: the window that already follows the task id, otherwise the window in which the task
was first sent (the ``sent_at`` its headers carry, kept through retries). So a task sent before a reset or a new
swarm is never counted in the new window — not as submitted, not as finished, not as retried, not as a latency
sample — even when it finishes afterwards; it finishes in its own window, or is dropped when that window was
discarded (a reset throws away what was counted before it, as Locust does).

**Reports.** When a swarm stops (``test_stop``: the Stop button, the form's run time, the end of a shape, or Ctrl-C /
SIGTERM while it runs), its window drains — up to ``--drain-timeout-s``, as in ``loadlab run`` — and the report is
written to ``RUN_DIR/swarm-NNN/`` (NNN = the swarm's number since the UI started, from 001): ``report.json`` (the
builder ``loadlab run`` uses, so it validates against ``reports/schema/report.schema.json``; its ``ui`` section names
the swarm, its user classes and where its counts start), ``report.html``, ``summary.md`` and ``locust/`` (Locust's
CSV tables of the swarm). It covers the swarm from its start — or from the last *Reset stats* during it — to the
stop, plus the drain: the same window the tab showed. The drain runs in the background, so the UI stays usable and a
new swarm may start meanwhile (its tasks go to its own window; the tab lists the swarm still draining). On quit, a
report still draining is finished before the stack stops. The terminal prints where each report is, and the tab's
*Report* row shows it — Locust's page stops polling once a test is stopped, so the drained numbers and the report
path appear when the page is reloaded (or at the next swarm).
"""
from __future__ import annotations

import csv
import io
import json
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import gevent
from locust import LoadTestShape, User
from locust import events as locust_events
from locust.env import Environment
from locust.event import Events

from loadlab.config.settings import Settings
from loadlab.exporters import ledger
from loadlab.loadtests.celery_tab import CHART_POINTS, celery_stats, table_rows
from loadlab.loadtests.class_picker import tick_only
from loadlab.loadtests.queue_sampler import QueueDepthStats, QueueSampler, one_line
from loadlab.loadtests.runner import STOP_TIMEOUT_S, completion_listener, locust_section
from loadlab.loadtests.scenarios import SCENARIOS, Scenario, get_scenario
from loadlab.loadtests.user_locustfile import locustfile_shape, run_user_classes
from loadlab.loadtests.users import build_user_classes
from loadlab.reports.recorder import Recorder
from loadlab.stack.tasks import retry_limits
from loadlab.reports.session import RunSession

TAB_KEY = "celery"
STATS_ROUTE = "/celery/stats"
CSV_ROUTE = "/celery/stats/csv"
CHARTS_ROUTE = "/celery/charts.js"
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
        from loadlab.loadtests.shapes import shape_for

        shape = shape_for(shape_name, settings.users or scenario.users, settings.duration or scenario.duration_s,
                          settings.spawn_rate or scenario.spawn_rate)
        shapes[f"{_prefix(scenario)}Shape"] = shape
    return shapes


def ui_environment(settings: Settings, csv_prefix: str | None = None) -> Environment:
    """A Locust environment whose class picker offers every scenario's users, the chosen scenario's ticked; with
    ``--locustfile``, the file's users instead (the scenarios' are not offered), all ticked, with the run's settings
    as under ``loadlab run --locustfile``, and the file's listeners on Locust's module-level events (one UI per
    process), as under the locust command. The form starts at the chosen scenario's users and spawn rate."""
    from locust.argument_parser import get_parser

    scenario = get_scenario(settings.scenario)
    shapes = scenario_shape_classes(settings)
    if settings.locustfile:
        available = {cls.__name__: cls for cls in run_user_classes(settings, scenario)}
        default_classes = list(available.values())
        shape = locustfile_shape(settings)  # offered in the picker's shapes (the picker's form chooses one)
        if shape is not None:
            shapes[type(shape).__name__] = shape
    else:
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
    return Environment(user_classes=default_classes, events=locust_events if settings.locustfile else Events(),
                       host=settings.api_url, stop_timeout=STOP_TIMEOUT_S, parsed_options=options,
                       locustfile=Path(settings.locustfile).name if settings.locustfile else "loadlab ui",
                       available_user_classes=available, available_shape_classes=shapes,
                       available_user_tasks={name: cls.tasks for name, cls in available.items()})


# --- broker and worker state, polled in the background --------------------------------------------------------------
class CeleryMonitor:
    """Caches queue depth and worker pings, refreshed by two greenlets (``start``) or on demand (``refresh_*``)."""

    def __init__(self, settings: Settings, *, expected_workers: int | None = None,
                 ping_interval_s: float = PING_INTERVAL_S,
                 ping_timeout_s: float = PING_TIMEOUT_S):
        from loadlab.stack.app import make_app

        self.settings = settings
        self.queue = settings.queue
        self.expected_workers = expected_workers
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        # no ledger hooks: the monitor publishes control messages only
        self.app = make_app(settings.model_copy(update={"ledger_url": None}))
        # its on_sample (epoch seconds, depth; depth None when the poll failed) feeds the reports' queue depth
        self.queue_sampler = QueueSampler(self.app, self.queue, settings.queue_sample_interval_s)
        self.worker_state: dict = {"up": None, "names": [], "error": None, "at": None}
        # the tab's queue chart: [epoch s, ready, unacked] of the sampler's recent polls
        self.queue_history: deque = deque(maxlen=CHART_POINTS)
        self._greenlets: list[gevent.Greenlet] = []

    def start(self) -> "CeleryMonitor":
        self.queue_sampler.start()
        self._greenlets = [gevent.spawn(self._every, self.ping_interval_s, self.refresh_workers),
                           gevent.spawn(self._every, self.settings.queue_sample_interval_s, self.remember_queue)]
        return self

    def remember_queue(self) -> None:
        state = self.queue_sampler.state
        if state["at"] is not None and (not self.queue_history or self.queue_history[-1][0] != state["at"]):
            self.queue_history.append([state["at"], state["depth"], state["unacked"]])

    def stop(self) -> None:
        gevent.killall(self._greenlets, timeout=5)
        self._greenlets = []
        self.queue_sampler.stop()
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
        self.queue_sampler.sample()

    @property
    def queue_state(self) -> dict:
        return self.queue_sampler.state

    def refresh_workers(self) -> None:
        try:
            replies = self.app.control.ping(timeout=self.ping_timeout_s) or []
        except Exception as exc:  # noqa: BLE001
            self.worker_state = {**self.worker_state, "error": one_line(exc), "at": time.time()}
            return
        names = sorted({name for reply in replies for name in reply})
        self.worker_state = {"up": len(names), "names": names, "error": None, "at": time.time()}

    def snapshot(self) -> dict:
        return {"queue": {"name": self.queue, **self.queue_state},
                "workers": {"expected": self.expected_workers, **self.worker_state}}




# --- the tab ------------------------------------------------------------------------------------------------------
def install_celery_tab(environment: Environment, recorder: Callable[[], object | None],
                       monitor: CeleryMonitor | None, since: float | None = None,
                       window: Callable[[], dict] | None = None) -> None:
    """Adds the Celery tab, its JSON and CSV routes, and the ``extended_stats`` of ``/stats/requests``.
    ``recorder()`` is the recorder the tab reads; ``window()`` (``SwarmWindows.window_info``), when given, says
    which window that is and since when it counts."""
    from flask import Response, jsonify, request

    web_ui = environment.web_ui
    since = since or time.time()

    def current() -> dict:
        if window is None:
            return celery_stats(recorder(), monitor, since)
        info = window()
        return celery_stats(recorder(), monitor, info["started_at"], info)

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

    @web_ui.app.route(CHARTS_ROUTE)
    @web_ui.auth_required_if_enabled
    def celery_charts_js():
        script = resources.files("loadlab.loadtests").joinpath("webui_assets/celery_charts.js").read_text()
        return Response(script, mimetype="text/javascript")

    @web_ui.app.after_request
    def add_celery_stats(response):
        if request.path == "/" and response.status_code == 200 and response.mimetype == "text/html":
            page = response.get_data(as_text=True)  # the tab's charts, drawn by a script of the page's own
            response.set_data(page.replace("</body>", f'<script src=".{CHARTS_ROUTE}"></script>\n</body>', 1))
            return response
        if request.path != "/stats/requests" or response.status_code != 200 or not response.is_json:
            return response
        body = response.get_json()
        body["extended_stats"] = [{"key": TAB_KEY, "data": table_rows(current())}]
        response.set_data(json.dumps(body))
        return response


# --- recording windows: one per swarm (and per "Reset stats"), a report when a swarm stops ---------------------------
SWARM_DIR = "swarm-{:03d}"
COUNTED_FROM = {"ui_start": "the start of the UI", "test_start": "the start of the swarm",
                "reset_stats": "Reset stats"}


class WindowRecorder(Recorder):
    """The run recorder of one window. It never pops the ledger itself: ``SwarmWindows`` pops it and hands each
    record to the window its task belongs to. ``poll`` (which ``drain`` and ``mark_load_stopped`` call) makes the
    dispatcher pop what is waiting and answers how many records reached *this* window since the previous call, so a
    drain waits for its own tasks and is not kept busy by another swarm's."""

    def __init__(self, windows: "SwarmWindows", settings: Settings,
                 on_completion: Callable[[str, str, float | None], None] | None = None):
        super().__init__(settings.ledger_url, settings.run_id,
                         max_retries=retry_limits(windows.app) if windows.app is not None else settings.retry_max_retries,
                         on_completion=on_completion, warmup_s=settings.warmup_s)
        self._windows = windows
        self._records_seen = 0
        self.adopted = 0  # tasks that ran but whose SENT record never came, counted as submitted by close()
        # Closed: its report is being written from what it has, so records that still come for its tasks are
        # dropped and the tab keeps showing what the report says (e.g. an attempt that ended in a retry, whose
        # record came after the task's next attempt had already finished and the drain had ended)
        self.closed = False

    def start(self) -> "WindowRecorder":
        return self  # the dispatcher consumes

    def poll(self, batch: int = 1000) -> int:
        self._windows.poll(batch)
        arrived, self._records_seen = self.records - self._records_seen, self.records
        return arrived

    def close(self) -> None:
        """Last records, and tasks that finished without a SENT record counted (the shared channel is kept)."""
        self._windows.poll(100_000)
        self.adopted += len(self.early)
        self.adopt_orphans()
        self.closed = True

    def follows(self, task_id: str) -> bool:
        return (task_id in self.pending or task_id in self.retrying or task_id in self.early
                or task_id in self.recent_terminal)

    @property
    def in_flight(self) -> int:
        return len(self.pending)  # a task waiting for a retry is pending too

    @property
    def settled(self) -> bool:
        return not self.pending and not self.retrying


@dataclass
class Window:
    """What the tab counts from one boundary (UI start, swarm start, Reset stats) to the next."""
    started_at: float
    counted_from: str                # ui_start | test_start | reset_stats
    swarm: int | None                # the swarm it measures; None: no swarm was running when it opened
    recorder: WindowRecorder | None  # None once released (reported, or discarded and settled)
    state: str                       # idle | running | draining | reported | discarded
    scenario: str = "ui"
    user_classes: list[str] = field(default_factory=list)
    shape: str | None = None
    discarded_at: float | None = None
    report_dir: Path | None = None
    locust: dict | None = None
    queue: QueueDepthStats = field(default_factory=QueueDepthStats)


class SwarmWindows:
    """The recorder state behind the Celery tab, started afresh at every swarm and every *Reset stats*, and the
    per-swarm reports (see the module docstring). ``install()`` adds the Locust event listeners, ``start()`` the
    consumer greenlet; ``recorder`` is what the tab reads."""

    def __init__(self, settings: Settings, run_dir: Path, environment: Environment, *, console=None, app=None,
                 on_completion: Callable[[str, str, float | None], None] | None = None,
                 scenario_names: dict[str, str] | None = None, queue_sampler: QueueSampler | None = None):
        self.settings = settings
        self.run_dir = Path(run_dir)
        self.environment = environment
        self.console = console
        self.app = app  # for reconcile(): the result backend of tasks the ledger never saw finish
        self.on_completion = on_completion
        self.queue_sampler = queue_sampler  # it feeds observe_queue_depth; None: no queue depth in the reports
        self.scenario_names = scenario_names or {_prefix(sc): sc.name for sc in SCENARIOS.values()}
        self.key = ledger.channel_key(settings.run_id)
        self.windows: list[Window] = []
        self.swarms = 0
        self.dropped = 0  # records of tasks sent in a discarded window after it settled, or in a reported one
        self.reports: list[Path] = []
        self.errors: list[str] = []
        self._client = None
        self._poll_lock = threading.Lock()  # a gevent lock in the patched process: one pop-and-dispatch at a time
        self._consumer: gevent.Greenlet | None = None
        self._finishers: list[gevent.Greenlet] = []
        self._open("ui_start", swarm=None, state="idle")

    # --- the windows ---------------------------------------------------------------------------------------------
    @property
    def current(self) -> Window:
        return self.windows[-1]

    @property
    def recorder(self) -> WindowRecorder | None:
        return self.current.recorder

    def _open(self, counted_from: str, swarm: int | None, state: str, like: Window | None = None) -> Window:
        now = time.time()
        if self.windows:
            previous = self.current
            if previous.state in ("idle", "running"):  # what was counted before the boundary is thrown away
                previous.state, previous.discarded_at = "discarded", now
        window = Window(started_at=now, counted_from=counted_from, swarm=swarm, recorder=None, state=state)
        if like is not None:
            window.scenario, window.user_classes, window.shape = like.scenario, like.user_classes, like.shape

        listener = self.on_completion

        def on_completion(task: str, task_state: str, end_to_end_s: float | None) -> None:
            # Locust's end_to_end requests: only the shown window's, so a new test's table has no older task
            if listener is not None and self.current is window:
                listener(task, task_state, end_to_end_s)

        window.recorder = WindowRecorder(self, self.settings, on_completion)
        self.windows.append(window)
        self._prune()
        return window

    def _prune(self) -> None:
        """Releases the recorders of windows nobody shows or reports any more: reported ones, and discarded ones
        once nothing they follow is in flight (or a drain's time after the discard)."""
        now = time.time()
        patience = self.settings.drain_timeout_s + STOP_TIMEOUT_S
        for window in self.windows[:-1]:
            if window.recorder is None:
                continue
            if window.state == "reported" or (window.state == "discarded" and (
                    window.recorder.settled or now - window.discarded_at > patience)):
                window.recorder = None

    def _route(self, record: list) -> Window | None:
        task_id = record[1]
        for window in reversed(self.windows):
            if window.recorder is not None and window.recorder.follows(task_id):
                return window
        sent_at = record[3] if record[0] == ledger.SENT else record[4] if record[0] == ledger.ATTEMPT else None
        if sent_at is None:  # a revoke carries no send time: the shown window
            return self.current
        for window in reversed(self.windows):
            if window.started_at <= sent_at:
                return window if window.recorder is not None else None
        return self.windows[0] if self.windows[0].recorder is not None else None

    # --- consuming the ledger ------------------------------------------------------------------------------------
    def _redis(self):
        if self._client is None:
            import redis

            self._client = redis.Redis.from_url(self.settings.ledger_url, socket_timeout=10)
        return self._client

    def start(self) -> "SwarmWindows":
        self._consumer = gevent.spawn(self._loop)
        return self

    def _loop(self) -> None:
        while True:
            if not self.poll():
                gevent.sleep(0.02)

    def poll(self, batch: int = 1000) -> int:
        """Pops what is in the ledger now and hands each record to its window; returns the records popped."""
        with self._poll_lock:
            items = ledger.pop_batch(self._redis, self.key, batch)
            if items is None:
                self._client = None
                return 0
            if not items:
                self._prune()
                return 0
            for data in items:
                record = ledger.decode(data)
                window = self._route(record)
                recorder = window.recorder if window is not None else None
                if recorder is None or recorder.closed:
                    self.dropped += 1
                    continue
                with recorder._lock:
                    recorder.handle(record)
            return len(items)

    def observe_queue_depth(self, at: float, depth: int | None) -> None:
        """A queue depth sample (None: the poll failed) for every window still measuring."""
        error = self.queue_sampler.state["error"] if self.queue_sampler is not None else None
        for window in self.windows:
            if window.recorder is not None and window.state in ("idle", "running", "draining"):
                window.queue.observe(depth, error)
                if depth is not None:
                    window.recorder.observe_queue_depth(at, depth)

    # --- Locust's events -----------------------------------------------------------------------------------------
    def install(self) -> "SwarmWindows":
        events = self.environment.events
        events.test_start.add_listener(self.on_test_start)
        events.reset_stats.add_listener(self.on_reset_stats)
        events.test_stop.add_listener(self.on_test_stop)
        return self

    def on_test_start(self, environment: Environment | None = None, **_) -> None:
        self.swarms += 1
        window = self._open("test_start", swarm=self.swarms, state="running")
        env = environment or self.environment
        window.user_classes = sorted(cls.__name__ for cls in env.user_classes)
        shape = env.shape_class
        if shape is not None:
            window.shape = next((name for name, obj in (env.available_shape_classes or {}).items() if obj is shape),
                                type(shape).__name__)
        window.scenario = self.scenario_of(window.user_classes, window.shape)

    def on_reset_stats(self, **_) -> None:
        current = self.current
        if current.state == "running":  # the swarm goes on, counted from now
            self._open("reset_stats", swarm=current.swarm, state="running", like=current)
        else:  # no swarm running: an empty window until the next one (a draining report is not affected)
            self._open("reset_stats", swarm=None, state="idle")

    def on_test_stop(self, environment: Environment | None = None, **_) -> None:
        window = self.current
        if window.state != "running":  # quit before any swarm, or a swarm already stopped
            return
        window.state = "draining"
        window.report_dir = self.run_dir / SWARM_DIR.format(window.swarm)
        window.locust = self._locust_now(window)
        greenlet = gevent.spawn(self._finish, window)
        self._finishers.append(greenlet)

    def scenario_of(self, user_classes: list[str], shape: str | None) -> str:
        if self.settings.locustfile:  # the file's users, whatever their names: a report names the file
            return f"locustfile:{Path(self.settings.locustfile).name}"
        names = []
        for name in ([shape.removesuffix("Shape") + "_"] if shape else []) + user_classes:
            scenario = self.scenario_names.get(name.split("_", 1)[0], "ui")
            if scenario not in names:
                names.append(scenario)
        return "+".join(names) or "ui"

    # --- reports -------------------------------------------------------------------------------------------------
    def _locust_now(self, window: Window) -> dict:
        """Locust's totals and CSV tables of the swarm, written into its report directory."""
        from locust.stats import StatsCSV

        locust_dir = window.report_dir / "locust"
        locust_dir.mkdir(parents=True, exist_ok=True)
        tables = StatsCSV(self.environment, [0.5, 0.9, 0.95, 0.99, 1.0])
        for suffix, write in (("_stats.csv", tables.requests_csv), ("_failures.csv", tables.failures_csv),
                              ("_exceptions.csv", tables.exceptions_csv)):
            with open(locust_dir / f"locust{suffix}", "w", newline="") as handle:
                write(csv.writer(handle))
        return locust_section(self.environment)

    def _finish(self, window: Window) -> None:
        try:
            self._drain_and_report(window)
        except Exception as exc:  # noqa: BLE001 - say so; the UI and the next swarms go on
            self.errors.append(f"swarm {window.swarm}: {one_line(exc)}")
            window.state = "reported"
            if self.console is not None:
                self.console.print(f"[bold red]error:[/] the report of swarm {window.swarm} failed: {one_line(exc)}")

    def _drain_and_report(self, window: Window) -> None:
        from loadlab.reports.render import write_rendered
        from loadlab.reports.report import iso_utc

        runner = self.environment.runner
        users = getattr(runner, "user_greenlets", None)
        if users is not None:  # users finish the task they are in: their last publishes are the swarm's too
            users.join(timeout=STOP_TIMEOUT_S + 1)
        recorder = window.recorder
        recorder.mark_load_stopped()
        session = RunSession(self.settings, recorder, self.app, window.report_dir, window.scenario)
        session.drain()
        if self.queue_sampler is not None:  # the queue as the drain left it
            self.queue_sampler.wait_for_next_sample(2.5 * self.queue_sampler.interval_s)
        recorder.close()
        if self.current is window:  # Locust's table is still this swarm's: with the end_to_end of the drain
            window.locust = self._locust_now(window)
        extra = {"artefacts": {"Locust CSV of the swarm": "locust/", "settings": "../settings.json",
                               "process logs": "../logs/", "Locust CSV history of the UI session": "../locust/"},
                 "ui": {"swarm": window.swarm, "counted_from": COUNTED_FROM[window.counted_from],
                        "window_started_at": iso_utc(window.started_at), "user_classes": window.user_classes,
                        "shape": window.shape,
                        # in tasks.submitted, not in Locust's table: a user stopped between the broker's accept
                        # and its ledger record / request event (Locust kills users that wait, and one that was
                        # just waking up dies in its next publish)
                        "submitted_without_sent_record": recorder.adopted}}
        if self.queue_sampler is not None:
            extra["queue_depth_sampling"] = window.queue.summary(self.queue_sampler, "the Celery tab's broker poll")
        # matplotlib's plots take a second or more of CPU: in a native thread the event loop goes on serving the UI
        # and the next swarm meanwhile (the GIL is handed over every few ms), where in a greenlet it would stall both
        report = session.write(started_at=window.started_at, locust=window.locust, extra=extra,
                               render=lambda path, data: gevent.get_hub().threadpool.apply(write_rendered, (path, data)))
        window.state = "reported"
        self.reports.append(window.report_dir)
        self._prune()
        if self.console is not None:
            t = report["tasks"]
            self.console.print(
                f"swarm {window.swarm} ({window.scenario}) [bold]{report['verdict']['status'].upper()}[/]  "
                f"submitted {t['submitted']}  succeeded {t['succeeded']}  failed {t['failed']}  "
                f"retried {t['retried']}  lost {t['lost']}")
            # one line whatever the terminal's width: the path stays copyable
            self.console.print(f"report: {window.report_dir / 'report.html'}", soft_wrap=True, markup=False)

    def window_info(self) -> dict:
        """The shown window for the tab: which swarm, since when it counts, and where its report is."""
        window = self.current
        if window.state == "running":
            status = f"written when the swarm stops: {self.run_dir / SWARM_DIR.format(window.swarm)}/"
        elif window.state == "draining":  # Locust's page stops polling when stopped: say how to see the end
            status = (f"draining: {window.recorder.in_flight} in flight (≤ {self.settings.drain_timeout_s:g}s), "
                      f"then {window.report_dir}/report.html (reload the page to see it)")
        elif window.state == "reported":
            status = str(window.report_dir / "report.html")
        else:
            status = f"last: {self.reports[-1] / 'report.html'}" if self.reports else None
        draining = [{"swarm": w.swarm, "in_flight": w.recorder.in_flight} for w in self.windows[:-1]
                    if w.state == "draining" and w.recorder is not None]
        return {"swarm": window.swarm, "counted_from": window.counted_from, "started_at": window.started_at,
                "state": window.state, "scenario": window.scenario if window.swarm is not None else None,
                "report_dir": str(window.report_dir) if window.report_dir else None, "report_status": status,
                "earlier_swarms_draining": draining, "reports": [str(path) for path in self.reports],
                "dropped_records": self.dropped}

    def join(self, timeout_s: float) -> bool:
        """Waits for the reports still draining; True when none is left."""
        gevent.joinall(self._finishers, timeout=timeout_s)
        self._finishers = [g for g in self._finishers if not g.dead]
        return not self._finishers

    @property
    def draining(self) -> list[int]:
        return [w.swarm for w in self.windows if w.state == "draining"]

    def close(self) -> None:
        gevent.killall(self._finishers, timeout=5)
        if self._consumer is not None:
            self._consumer.kill(timeout=5)
        self.poll(100_000)
        try:
            self._redis().delete(self.key)
        except Exception:  # noqa: BLE001
            pass


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
    """Stack up, web UI on 127.0.0.1:web_port with the Celery tab; each swarm's report in run_dir/swarm-NNN/ when it
    stops. Blocks until Ctrl-C/SIGTERM, then stops the load, finishes the report of the swarm that ran (or was still
    draining) and stops every process of the stack."""
    from locust.stats import StatsCSVFileWriter, stats_history

    from loadlab.reports.report import write_json
    from loadlab.stack.supervisor import start_stack

    # Locust's web UI parses sys.argv with its own parser on every page load (the "custom parameters" of its
    # form): loadlab's flags would make that parser exit, so the process shows it no arguments.
    sys.argv[1:] = []
    stack = start_stack(settings, run_dir, console)
    if stack is None:
        return EXIT_FAILED
    runner = web_ui = windows = monitor = writer = None
    greenlets: list[gevent.Greenlet] = []
    try:
        s = stack.settings
        write_json(run_dir / "settings.json", s.masked())
        (run_dir / "locust").mkdir(parents=True, exist_ok=True)
        csv_prefix = str(run_dir / "locust" / "locust")
        env = ui_environment(s, csv_prefix=csv_prefix)
        runner = env.create_local_runner()
        monitor = CeleryMonitor(s, expected_workers=s.workers)
        windows = SwarmWindows(s, run_dir, env, console=console, app=monitor.app, queue_sampler=monitor.queue_sampler,
                               on_completion=completion_listener(env)).install().start()
        monitor.queue_sampler.on_sample = windows.observe_queue_depth
        monitor.start()
        writer = StatsCSVFileWriter(env, [0.5, 0.9, 0.95, 0.99, 1.0], csv_prefix, full_history=True)
        web_ui = env.create_web_ui("127.0.0.1", web_port, delayed_start=True, userclass_picker_is_active=True,
                                   stats_csv_writer=writer)
        install_celery_tab(env, lambda: windows.recorder, monitor, window=windows.window_info)
        tick_only(web_ui, [cls.__name__ for cls in env.user_classes])  # the chosen scenario's classes, alone
        if s.locustfile:  # the file's init listeners, told as the locust command tells them
            env.events.init.fire(environment=env, runner=runner, web_ui=web_ui)
        web_ui.start()
        greenlets = [gevent.spawn(stats_history, runner), gevent.spawn(writer.stats_writer)]
        url = f"http://127.0.0.1:{web_port}"
        console.print(f"[green]Locust web UI[/] {url}  (Celery tab after you start a test; JSON {url}{STATS_ROUTE})")
        console.print(f"producer API {s.api_url}   logs {run_dir / 'logs'}   Ctrl-C stops everything.")
        if s.locustfile:
            console.print(f"users of {s.locustfile}: {', '.join(sorted(env.available_user_classes))}", soft_wrap=True,
                          markup=False)
        console.print(f"each swarm's report, written when it stops: {run_dir / SWARM_DIR.format(1)}/, "
                      f"{SWARM_DIR.format(2)}/, … (report.json, report.html, summary.md)", soft_wrap=True, markup=False)
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
            runner.quit()  # a swarm still running stops: test_stop starts its report
            if s.locustfile:
                runner.environment.events.quitting.fire(environment=runner.environment, reverse=True)
        if web_ui is not None and web_ui.server is not None:
            web_ui.stop()
        if windows is not None and windows.draining:
            swarms = ", ".join(str(n) for n in windows.draining)
            try:
                with console.status(f"draining and writing the report of swarm {swarms} "
                                    f"(≤ {s.drain_timeout_s:g}s; Ctrl-C again skips it)…"):
                    windows.join(s.drain_timeout_s + STOP_TIMEOUT_S + 30)
            except (KeyboardInterrupt, SystemExit):
                console.print(f"[yellow]the report of swarm {swarms} was not written[/]")
        gevent.killall(greenlets, timeout=5)
        if writer is not None:
            writer.close_files()
        if monitor is not None:
            monitor.stop()
        if windows is not None:
            windows.close()
        with console.status("stopping the stack…"):
            stack.stop()
