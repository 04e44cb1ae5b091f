"""Starts and stops a whole stack: embedded Redis (when no broker/backend is given), N Celery workers and the
producer API, each logging into the run directory; waits for readiness with a deadline; stops everything."""
from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

from loadlab.config.settings import Settings
from loadlab.stack import embedded
from loadlab.stack.processes import Child, stop_together


class StartupError(RuntimeError):
    """A process did not become ready; the message names it and carries the tail of its log."""


class Stack:
    def __init__(self, settings: Settings, run_dir: Path, *, api: bool = True, log=print):
        self.requested = settings
        self.settings = settings  # resolved (URLs filled in) once started
        self.run_dir = Path(run_dir)
        self.log_dir = self.run_dir / "logs"
        self.with_api = api
        self.log = log
        self.redis: Child | None = None          # the embedded broker (and backend)
        self.broker_embedded = False             # the broker is self.redis (it may serve only as the backend)
        self.ledger_redis: Child | None = None   # the run's ledger channel, apart from the system under test
        self.workers: list[Child] = []
        self.api: Child | None = None
        self.exporter: Child | None = None
        self.flower: Child | None = None
        self.endpoints: dict[str, str] = {}  # name -> /metrics URL of every process that serves one
        self._app = None

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def __enter__(self) -> "Stack":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def children(self) -> list[Child]:
        return [c for c in [self.api, self.flower, *self.workers, self.exporter, self.redis, self.ledger_redis]
                if c is not None]

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._start_embedded_redis()
        self._start_observers()  # before the workers, so their worker-online events are seen
        s = self.settings
        for index in range(1, s.workers + 1):
            self.workers.append(self._worker_child(index).start())
        if self.with_api:
            port = s.api_port or embedded.free_port()
            self.settings = s = s.model_copy(update={"api_url": f"http://{s.api_client_host}:{port}", "api_port": port})
            self.api = Child("api", [sys.executable, "-m", "uvicorn", "loadlab.stack.api:create_app", "--factory",
                                     "--host", s.api_host, "--port", str(port), "--no-access-log",
                                     "--log-level", "warning"],
                             self.log_dir / "api.log", env=s.child_env()).start()
        self.wait_ready()

    def stop(self) -> None:
        # API first (no new work), then workers (warm shutdown) beside Flower and the exporter, the brokers last.
        stop_together([(self.api, 5)] if self.api else [])
        stop_together([(c, 10 if c in self.workers else 5) for c in [self.flower, *self.workers, self.exporter] if c])
        stop_together([(c, 5) for c in [self.redis, self.ledger_redis] if c])
        if self._app is not None:
            try:
                self._app.close()
            except Exception:  # noqa: BLE001
                pass
            self._app = None

    # --- parts -------------------------------------------------------------------------------------------------
    def _start_embedded_redis(self) -> None:
        """The embedded broker (when no broker or backend is given) and, always, the run's own ledger Redis: the
        harness keeps its records apart from the system under test, so a broker restart loses no ledger record."""
        s = self.settings
        updates = {}
        if s.broker is None or s.backend is None:
            port = embedded.free_port()
            data_dir = self.run_dir / "redis"
            data_dir.mkdir(parents=True, exist_ok=True)
            self.redis = Child("redis", embedded.redis_command(port, data_dir, appendonly=s.broker_persistence),
                               self.log_dir / "redis.log").start()
            updates["broker"] = s.broker or embedded.redis_url(port, 0)
            self.broker_embedded = s.broker is None
            updates["backend"] = s.backend or (s.broker if s.broker and s.broker.startswith("redis")
                                               else embedded.redis_url(port, 1))
            self._wait(lambda: self._redis_ping(embedded.redis_url(port, 0)), self.redis, "embedded Redis")
        if s.ledger_url is None:
            port = embedded.free_port()
            data_dir = self.run_dir / "ledger-redis"
            data_dir.mkdir(parents=True, exist_ok=True)
            self.ledger_redis = Child("ledger-redis", embedded.redis_command(port, data_dir),
                                      self.log_dir / "ledger-redis.log").start()
            updates["ledger_url"] = embedded.redis_url(port, 0)
            self._wait(lambda: self._redis_ping(updates["ledger_url"]), self.ledger_redis, "ledger Redis")
        self.settings = s.model_copy(update=updates)

    # --- faults (chaos) ----------------------------------------------------------------------------------------
    def restart(self, child: Child, *, kill: bool = True) -> Child:
        """SIGKILL (or stop) a child and start the same command again; returns the new child."""
        if kill:
            child.kill()
        else:
            child.stop(timeout=10)
        fresh = Child(child.name, child.command, child.log_path, env=child.env, stop_signal=child.stop_signal).start()
        for attribute in ("redis", "ledger_redis", "api", "exporter", "flower"):
            if getattr(self, attribute, None) is child:
                setattr(self, attribute, fresh)
        self.workers = [fresh if w is child else w for w in self.workers]
        return fresh

    def wait_redis(self) -> None:
        self._wait(lambda: self._redis_ping(self.settings.broker), self.redis, "embedded Redis")

    def wait_api(self) -> None:
        self._wait(self._api_healthy, self.api, "producer API")

    def wait_worker(self, index: int, timeout: float | None = None) -> None:
        worker = self.workers[index - 1]
        deadline = time.monotonic() + (timeout or self.settings.startup_timeout_s)
        while not self._workers_answer({self.worker_name(index)}):
            if not worker.running():
                raise StartupError(f"{worker.name} exited after a restart; last lines of {worker.log_path}:\n"
                                   f"{worker.log_tail()}")
            if time.monotonic() > deadline:
                raise StartupError(f"{worker.name} did not answer within {timeout}s of its restart")
            time.sleep(0.2)

    def _worker_child(self, index: int) -> Child:
        s = self.settings
        command = [sys.executable, "-m", "celery", "-A", "loadlab.stack.worker_app:app", "worker",
                   "--hostname", self.worker_name(index), "--queues", ",".join(s.worker_queues), "--pool", s.pool, "--concurrency", str(s.concurrency),
                   "--loglevel", "INFO", "--without-mingle", "--without-gossip"]
        if not s.app or "prefetch_multiplier" in s.explicit:  # else the user's app keeps its own
            command += ["--prefetch-multiplier", str(s.prefetch_multiplier)]
        if s.max_tasks_per_child:
            command += ["--max-tasks-per-child", str(s.max_tasks_per_child)]
        if s.flower:
            # Flower counts tasks from task events. Heartbeats (the exporter's celery_worker_up) need no -E.
            command.append("--task-events")
        return Child(f"worker{index}", command, self.log_dir / f"worker{index}.log", env=s.child_env())

    def _start_observers(self) -> None:
        """The exporter service (metrics on) and Flower (--flower), each on a free port, /metrics in ``endpoints``."""
        s = self.settings
        if s.metrics == "on":
            port = embedded.free_port()
            self.exporter = Child("exporter", [sys.executable, "-m", "loadlab.exporters.exporter_service",
                                               "--host", s.metrics_host, "--port", str(port)],
                                  self.log_dir / "exporter.log", env=s.child_env(ledger_url=None)).start()
            self.endpoints["exporter"] = f"http://{_local(s.metrics_host)}:{port}/metrics"
        if s.flower:
            port = s.flower_port or embedded.free_port()
            self.flower = Child("flower", [sys.executable, "-m", "celery", "-A", "loadlab.stack.worker_app:app", "flower",
                                           "--address=127.0.0.1", f"--port={port}", "--logging=warning"],
                                # Flower only watches: no ledger, metric or tracing hooks in its process
                                self.log_dir / "flower.log",
                                env=s.child_env(ledger_url=None, metrics="off", tracing="off")).start()
            self.endpoints["flower"] = f"http://127.0.0.1:{port}/metrics"

    @property
    def flower_url(self) -> str | None:
        return self.endpoints["flower"].removesuffix("/metrics") if "flower" in self.endpoints else None

    def worker_name(self, index: int) -> str:
        return f"w{index}.{self.settings.run_id}@127.0.0.1"

    @property
    def app(self):
        if self._app is None:
            from loadlab.stack.app import make_app

            # the supervisor's own control app: no ledger records, no tracer (no exporter thread in this process)
            self._app = make_app(self.settings.model_copy(update={"ledger_url": None, "tracing": "off"}))
        return self._app

    # --- readiness ---------------------------------------------------------------------------------------------
    def wait_ready(self) -> None:
        names = {self.worker_name(i) for i in range(1, len(self.workers) + 1)}
        self._wait(lambda: self._workers_answer(names), None, "workers", watch=self.workers)
        if self.exporter is not None:
            self._wait(lambda: self._metrics_show(self.endpoints["exporter"], "celery_worker_up", "hostname", names),
                       self.exporter, "exporter")
        if self.flower is not None:
            self._wait(lambda: self._metrics_show(self.endpoints["flower"], "flower_worker_online", "worker", names),
                       self.flower, "Flower")
        if self.api is not None:
            self._wait(lambda: self._api_healthy(), self.api, "producer API")

    def _wait(self, ready, child: Child | None, what: str, watch: list[Child] | None = None) -> None:
        watch = watch or ([child] if child else [])
        deadline = time.monotonic() + self.settings.startup_timeout_s
        while True:
            for c in watch:
                if not c.running():
                    raise StartupError(f"{c.name} exited with code {c.popen.returncode} before it was ready; "
                                       f"last lines of {c.log_path}:\n{c.log_tail()}")
            if ready():
                return
            if time.monotonic() > deadline:
                tail = "\n".join(f"--- {c.log_path}:\n{c.log_tail()}" for c in watch)
                raise StartupError(f"{what} not ready within {self.settings.startup_timeout_s:g}s.\n{tail}")
            time.sleep(0.2)

    @staticmethod
    def _redis_ping(url: str) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
        except Exception:  # noqa: BLE001
            return False

    def _workers_answer(self, names: set[str]) -> bool:
        try:
            replies = self.app.control.ping(destination=sorted(names), timeout=1.0) or []
        except Exception:  # noqa: BLE001 - broker not up yet
            return False
        answered = {name for reply in replies for name in reply}
        return names <= answered

    @staticmethod
    def _metrics_show(url: str, metric: str, label: str, names: set[str]) -> bool:
        """The endpoint answers and reports ``metric{label=<name>} 1`` for every worker: it sees the workers."""
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                text = response.read().decode()
        except Exception:  # noqa: BLE001 - not listening yet
            return False
        return all(f'{metric}{{{label}="{name}"}} 1.0' in text for name in names)

    def _api_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.settings.api_url}/healthz", timeout=2) as response:
                return response.status == 200 and json.load(response).get("status") == "ok"
        except Exception:  # noqa: BLE001
            return False


def _local(host: str) -> str:
    """Where this machine reaches a server bound to ``host``."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def start_stack(settings: Settings, run_dir: Path, console, error_console=None) -> Stack | None:
    """The stack of one run directory (its name is the run id) started behind a spinner; None, after printing why,
    when it does not start. The caller stops it (``stack.stop()``)."""
    settings = settings.model_copy(update={"run_id": run_dir.name.replace(".", "-"), "run_dir": str(run_dir)})
    try:
        with console.status("starting the stack (broker, workers, producer API)…"):
            return Stack(settings, run_dir).__enter__()
    except StartupError as exc:
        (error_console or console).print(f"[bold red]error:[/] the stack did not start: {exc}")
        return None
