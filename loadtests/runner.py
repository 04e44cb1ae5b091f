"""Runs a scenario headless with Locust as a library, writing Locust's own CSV stats and history."""
from __future__ import annotations

import csv
import sys
import time
from pathlib import Path
from typing import Callable

import gevent
from locust import events as locust_events
from locust.env import Environment
from locust.event import Events
from locust.stats import StatsCSVFileWriter, stats_history

from loadlab.config.settings import Settings
from loadlab.loadtests.scenarios import Scenario
from loadlab.loadtests.shapes import shape_for
from loadlab.loadtests.user_locustfile import locustfile_shape, run_user_classes
from loadlab.stack.embedded import free_port
from loadlab.stack.processes import Child, stop_together

LOCUSTFILE = Path(__file__).with_name("locustfile.py")

CSV_PERCENTILES = [0.5, 0.9, 0.95, 0.99, 1.0]
# users finish the task they are in when the load stops, so no publish is cut between broker and ledger
STOP_TIMEOUT_S = 5.0


def completion_listener(environment: Environment) -> Callable[[str, str, float | None], None]:
    """Recorder callback that reports each finished task to Locust as an ``end_to_end`` request."""
    fire = environment.events.request.fire

    def on_completion(task_name: str, state: str, end_to_end_s: float | None) -> None:
        fire(request_type="celery", name=f"{END_TO_END_PREFIX}{task_name}",
             response_time=(end_to_end_s or 0.0) * 1000, response_length=0,
             exception=None if state == "SUCCESS" else RuntimeError(f"task {state}"), context={})

    return on_completion


class LocustRun:
    def __init__(self, settings: Settings, scenario: Scenario, out_dir: Path):
        self.settings = settings
        self.scenario = scenario
        # a --locustfile's own load shape decides the users and when the load ends, as under the locust command
        shape = self.locustfile_shape = locustfile_shape(settings)
        if shape is None and scenario.shape:
            shape = shape_for(scenario.shape, settings.users or scenario.users, settings.duration or scenario.duration_s,
                              settings.spawn_rate or scenario.spawn_rate)
        # fresh event hooks per run: several runs in one process (sweeps) must not share listeners. A --locustfile
        # (one run per process) has its listeners on Locust's module-level events, as under the locust command.
        events = locust_events if settings.locustfile else Events()
        self.environment = Environment(user_classes=run_user_classes(settings, scenario), events=events,
                                       shape_class=shape, host=settings.api_url, stop_timeout=STOP_TIMEOUT_S)
        self.out_dir = Path(out_dir)
        self.started_at: float | None = None
        self.stopped_at: float | None = None
        self.worker_children: list[Child] = []
        self._last_reports: dict[str, float] = {}  # Locust worker id -> when its last stats report arrived

    @property
    def users(self) -> int:
        return self.settings.users or self.scenario.users

    @property
    def duration_s(self) -> float | None:
        """How long the load runs; with a locustfile's shape, --duration caps it, else the shape ends it (None)."""
        if self.locustfile_shape is not None:
            return self.settings.duration
        return self.settings.duration or self.scenario.duration_s

    def _load_over(self, runner) -> bool:
        """A locustfile's shape ended the load (its tick returned None and the runner stopped)."""
        from locust.runners import STATE_STOPPED, STATE_STOPPING

        return self.locustfile_shape is not None and runner.state in (STATE_STOPPING, STATE_STOPPED)

    def _start_runner(self):
        """A local runner, or a master with ``locust_workers`` worker processes running the same locustfile; a
        --locustfile's ``init`` listeners are told, as the locust command tells them."""
        env = self.environment
        count = self.settings.locust_workers
        port = free_port() if count else None
        runner = env.create_master_runner("127.0.0.1", port) if count else env.create_local_runner()
        if self.settings.locustfile:
            env.events.init.fire(environment=env, runner=runner, web_ui=None)
        if not count:
            return runner
        env.events.worker_report.add_listener(
            lambda client_id, data, **_: self._last_reports.__setitem__(client_id, time.monotonic()))
        log_dir = self.out_dir.parent / "logs"
        self.worker_children = [
            Child(f"locust-worker{i}", [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--worker",
                                        "--master-host", "127.0.0.1", "--master-port", str(port),
                                        "--stop-timeout", str(int(STOP_TIMEOUT_S)), "--loglevel", "WARNING"],
                  log_dir / f"locust-worker{i}.log", env=self.settings.child_env()).start()
            for i in range(1, count + 1)]
        deadline = time.monotonic() + self.settings.startup_timeout_s
        while len(runner.clients.ready) < count:
            for child in self.worker_children:
                if not child.running():
                    raise RuntimeError(f"{child.name} exited before it connected; last lines of {child.log_path}:\n"
                                       f"{child.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(runner.clients.ready)} of {count} Locust workers connected within "
                                   f"{self.settings.startup_timeout_s:g}s")
            gevent.sleep(0.1)
        return runner

    def run(self, tick: Callable[[float, dict], None] | None = None) -> None:
        """Blocks (cooperatively) for the load duration."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        env = self.environment
        try:
            runner = self._start_runner()
        except BaseException:
            self._stop_workers()
            raise
        writer = StatsCSVFileWriter(env, CSV_PERCENTILES, str(self.out_dir / "locust"), full_history=True)
        greenlets = [gevent.spawn(stats_history, runner), gevent.spawn(writer.stats_writer)]
        self.started_at = time.time()
        if env.shape_class is not None:
            runner.start_shape()
        else:
            runner.start(self.users, spawn_rate=self.settings.spawn_rate or self.scenario.spawn_rate)
        start = time.monotonic()
        end = start + self.duration_s if self.duration_s else float("inf")
        try:
            while time.monotonic() < end and not self._load_over(runner):
                gevent.sleep(min(0.5, max(0.0, end - time.monotonic())))
                if tick is not None:  # a shape that ends the load itself: no fraction known, None
                    tick((time.monotonic() - start) / self.duration_s if self.duration_s else None, self.stats())
        finally:
            # the load stops here: no user starts another task. Users finishing the one they are in (an API user's
            # status polls, up to STOP_TIMEOUT_S) do not stretch the load's duration, or rates would be understated.
            self.stopped_at = time.time()
            runner.stop()
            if self.worker_children:
                self._collect_final_worker_stats()
            else:  # stop() lets users finish their task in the background: their last requests count too
                runner.user_greenlets.join(timeout=STOP_TIMEOUT_S + 1)
            runner.quit()
            if self.settings.locustfile:
                env.events.quitting.fire(environment=env, reverse=True)
            self._stop_workers()
            gevent.killall(greenlets)
            writer.close_files()
            self._writer = writer
            self.write_final_csv()

    def _collect_final_worker_stats(self) -> None:
        """A Locust worker sends no stats when told to stop, only on its next periodic report (every
        WORKER_REPORT_INTERVAL s): wait for one report from each worker after its users stopped."""
        from locust.runners import WORKER_REPORT_INTERVAL

        stopped_at = time.monotonic()
        deadline = stopped_at + WORKER_REPORT_INTERVAL + 2
        while time.monotonic() < deadline:
            if len([t for t in self._last_reports.values() if t > stopped_at]) >= len(self.worker_children):
                return
            gevent.sleep(0.1)

    def _stop_workers(self) -> None:
        stop_together([(child, 5) for child in self.worker_children])

    def write_final_csv(self) -> None:
        """Rewrites Locust's totals (the periodic writer may have last run up to a second before the stop). Called
        again after the drain, the end_to_end rows count the tasks that finished during the drain too."""
        writer = getattr(self, "_writer", None)
        if writer is None:
            return
        for suffix, write in (("_stats.csv", writer.requests_csv), ("_failures.csv", writer.failures_csv),
                              ("_exceptions.csv", writer.exceptions_csv)):
            with open(str(self.out_dir / "locust") + suffix, "w", newline="") as handle:
                write(csv.writer(handle))

    def stats(self) -> dict:
        return locust_section(self.environment)


END_TO_END_PREFIX = "end_to_end "


def locust_section(environment: Environment) -> dict:
    """The report's ``locust`` section: Locust's totals and its per-request table. ``request_failures`` leaves out
    the ``end_to_end`` events, whose failures are tasks that failed (the ledger counts them), not failed requests."""
    stats = environment.stats
    rows = []
    for (name, method), entry in sorted(stats.entries.items(), key=lambda item: (item[0][1], item[0][0])):
        rows.append({"type": method, "name": name, "requests": entry.num_requests, "failures": entry.num_failures,
                     "median_ms": round(entry.median_response_time or 0.0, 3),
                     "p95_ms": round(entry.get_response_time_percentile(0.95) or 0.0, 3),
                     "p99_ms": round(entry.get_response_time_percentile(0.99) or 0.0, 3),
                     "max_ms": round(entry.max_response_time or 0.0, 3), "rps": round(entry.total_rps, 3)})
    total = stats.total
    end_to_end_failures = sum(r["failures"] for r in rows if r["name"].startswith(END_TO_END_PREFIX))
    return {"requests": total.num_requests, "failures": total.num_failures, "rps": round(total.total_rps, 3),
            "request_failures": total.num_failures - end_to_end_failures, "by_request": rows}
