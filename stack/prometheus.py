"""Debian's Prometheus, run by loadlab: beside a run (scraping every /metrics endpoint of it), or on a run's stored
TSDB (to query it afterwards). Shared by ``loadlab run --prometheus``, ``loadlab dashboards render`` and the
live-query test.

Layout of ``RUN_DIR/prometheus/`` (written by :class:`RunPrometheus`):

==================  ============================================================================================
``prometheus.yml``  the scrape config: every endpoint at ``SCRAPE_INTERVAL_S``, targets from ``targets.json``
``targets.json``    file-based service discovery: one entry per endpoint, ``job`` = its kind (worker, api,
                    loadgen, exporter, flower), ``endpoint`` = its name. Rewritten when an endpoint appears or
                    moves (a worker restarted by chaos serves on a new port); Prometheus watches the file.
``celery.rules.yml`` a copy of ``dashboards/alerts/celery.rules.yml``, evaluated every second during the run
``data/``           the TSDB (WAL and head chunks; a run is far shorter than a block)
``meta.json``       ``started_at`` (every endpoint scraped once) / ``stopped_at`` (Unix seconds), the scrape
                    interval and the targets
==================  ============================================================================================

Targets come from the same places as the run's final scrape (``loadlab.exporters.scrape``): ``Stack.endpoints`` (exporter,
Flower) and ``RUN_DIR/ports/*.json`` (workers, the producer API, the load generator — this process, included here).
"""
from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from loadlab.stack.embedded import free_port
from loadlab.stack.processes import Child

log = logging.getLogger("loadlab.prometheus")

DIR_NAME = "prometheus"
SCRAPE_INTERVAL_S = 1
STARTUP_TIMEOUT_S = 30.0
# Series Prometheus writes itself for every target (not exported by anything of loadlab).
SCRAPE_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped",
                           "scrape_samples_post_metric_relabeling", "scrape_series_added"})
# Keep a stored run's samples whatever its age when it is opened again (the default deletes them after 15 days).
RETENTION = "100y"


class PrometheusMissing(RuntimeError):
    """The ``prometheus`` binary is not installed (Debian/Ubuntu: ``apt-get install prometheus``)."""


class StoredRunError(ValueError):
    """The directory holds no usable Prometheus data of a run (not recorded with ``--prometheus``, or damaged)."""


class PrometheusError(RuntimeError):
    """Prometheus did not start, or answered a query with an error (the message carries Prometheus' own)."""


def binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        raise PrometheusMissing("prometheus not found on PATH; install it (Debian/Ubuntu: apt-get install prometheus).")
    return path


# --- targets and config ----------------------------------------------------------------------------------------------
def run_targets(run_dir: Path, stack_endpoints: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    """``name -> {"url", "job"}`` for every /metrics endpoint of a run, this process's own included."""
    found = {name: {"url": url, "job": name} for name, url in (stack_endpoints or {}).items()}
    for path in sorted((Path(run_dir) / "ports").glob("*.json")):
        try:
            entry = json.loads(path.read_text())
            url = entry["url"]
        except (OSError, ValueError, KeyError):
            continue  # half written or foreign: the next refresh sees it
        name = entry.get("name") or path.stem
        found[name] = {"url": url, "job": entry.get("kind") or name}
    return found


def file_sd(targets: dict[str, dict[str, str]]) -> list[dict[str, Any]]:
    """Prometheus file-based service discovery entries for ``run_targets()``."""
    entries = []
    for name, target in sorted(targets.items()):
        url = urllib.parse.urlsplit(target["url"])
        entries.append({"targets": [url.netloc],
                        "labels": {"job": target["job"], "endpoint": name,
                                   "__metrics_path__": url.path or "/metrics", "__scheme__": url.scheme or "http"}})
    return entries


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)  # Prometheus (and readers) never see half a file


def scrape_config(targets_file: Path | None, rule_files: list[Path] = (), interval_s: int = SCRAPE_INTERVAL_S) -> dict:
    interval = f"{interval_s}s"
    config: dict[str, Any] = {"global": {"scrape_interval": interval, "scrape_timeout": interval,
                                         "evaluation_interval": interval}}
    if rule_files:
        config["rule_files"] = [str(p) for p in rule_files]
    if targets_file is not None:
        config["scrape_configs"] = [{"job_name": "loadlab",
                                     "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": interval}]}]
    return config


# --- one Prometheus server -------------------------------------------------------------------------------------------
class Prometheus:
    """A ``prometheus`` child on a free loopback port with a small HTTP API client."""

    def __init__(self, config_file: Path, data_dir: Path, log_path: Path, *, retention: str | None = None,
                 title: str | None = None):
        self.config_file = Path(config_file)
        self.data_dir = Path(data_dir)
        self.log_path = Path(log_path)
        self.retention = retention
        self.title = title
        self.child: Child | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self, port: int) -> list[str]:
        command = [binary(), f"--config.file={self.config_file}", f"--storage.tsdb.path={self.data_dir}",
                   f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
        if self.retention:
            command.append(f"--storage.tsdb.retention.time={self.retention}")
        if self.title:
            command.append(f"--web.page-title={self.title}")
        return command

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> "Prometheus":
        """Start and wait until ``/-/ready`` answers (the TSDB is open, WAL replayed). A port taken between picking
        it and Prometheus binding it is retried on another one."""
        last = ""
        for _attempt in range(3):
            self.port = free_port()
            self.child = Child("prometheus", self.command(self.port), self.log_path).start()
            deadline = time.monotonic() + timeout
            while self.child.running():
                if self._ready():
                    return self
                if time.monotonic() > deadline:
                    tail = self.child.log_tail()
                    self.stop()
                    raise PrometheusError(f"prometheus was not ready within {timeout:g}s; last lines of "
                                          f"{self.log_path}:\n{tail}")
                time.sleep(0.1)
            last = self.child.log_tail()
            if "address already in use" not in last:
                break
        self.child = None
        raise PrometheusError(f"prometheus exited before it was ready; last lines of {self.log_path}:\n{last}")

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop(timeout=10)  # SIGTERM: Prometheus closes the TSDB cleanly (WAL and head chunks synced)
            self.child = None

    def running(self) -> bool:
        return self.child is not None and self.child.running()

    def __enter__(self) -> "Prometheus":
        if self.child is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    # --- HTTP API ------------------------------------------------------------------------------------------------
    def api(self, path: str, params: dict[str, Any] | list[tuple[str, Any]] | None = None, *,
            method: str = "POST", timeout: float = 30.0) -> Any:
        """``data`` of a ``/api/v1/<path>`` answer (queries are POSTed forms, so long expressions fit); raises
        PrometheusError with Prometheus' own error message (a parse error, say) when the status is not success."""
        query = urllib.parse.urlencode(params or {}, doseq=True)
        url = f"{self.url}/api/v1/{path}"
        if method == "GET":
            request = urllib.request.Request(f"{url}?{query}" if query else url)
        else:
            request = urllib.request.Request(url, data=query.encode(), method=method,
                                             headers={"Content-Type": "application/x-www-form-urlencoded"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as exc:  # 400 bad_data, 422 execution error: the body says why
            try:
                answer = json.load(exc)
            except ValueError:
                raise PrometheusError(f"/api/v1/{path}: HTTP {exc.code}") from None
        if answer.get("status") != "success":
            raise PrometheusError(f"{answer.get('errorType', 'error')}: {answer.get('error', answer)}")
        return answer["data"]

    def query(self, expr: str, at: float | None = None) -> dict:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.api("query", params)

    def query_range(self, expr: str, start: float, end: float, step: float) -> dict:
        return self.api("query_range", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                        "step": f"{step:g}"})

    def metric_names(self, match: str | None = None) -> set[str]:
        """Every metric name in the TSDB (``match``: only of the series that selector matches)."""
        params = [("match[]", match)] if match else None
        return set(self.api("label/__name__/values", params, method="GET"))

    def targets(self) -> list[dict]:
        return self.api("targets", {"state": "active"}, method="GET", timeout=10).get("activeTargets", [])


# --- beside a run ----------------------------------------------------------------------------------------------------
class RunPrometheus:
    """Prometheus beside a run: scrapes every endpoint of the run each second into ``RUN_DIR/prometheus/data`` and
    evaluates the alert rules. ``start()`` returns once every target was scraped (so counters have a sample before
    the load starts); ``finish()`` waits for a scrape after its call (the end of the drain is in the data), stops
    Prometheus cleanly and completes ``meta.json``."""

    def __init__(self, run_dir: Path, rules_file: Path, stack=None):
        self.run_dir = Path(run_dir)
        self.stack = stack
        self.dir = self.run_dir / DIR_NAME
        self.targets_file = self.dir / "targets.json"
        self.rules_file = rules_file
        self.meta_file = self.dir / "meta.json"
        self.meta: dict[str, Any] = {}
        self._targets: dict[str, dict[str, str]] = {}
        self.server: Prometheus | None = None

    def start(self, wait_s: float = 15.0) -> "RunPrometheus":
        self.dir.mkdir(parents=True, exist_ok=True)
        rules = self.dir / self.rules_file.name
        shutil.copyfile(self.rules_file, rules)
        self.refresh_targets()
        config = self.dir / "prometheus.yml"
        config.write_text(yaml.safe_dump(scrape_config(self.targets_file, [rules]), sort_keys=False), encoding="utf-8")
        self.server = Prometheus(config, self.dir / "data", self.run_dir / "logs" / "prometheus.log",
                                 retention=RETENTION)
        self.server.start()
        ready = time.time()
        self.meta = {"prometheus_started_at": ready, "started_at": ready, "url": self.server.url,
                     "scrape_interval_s": SCRAPE_INTERVAL_S, "targets": self._targets}
        write_json_atomic(self.meta_file, self.meta)
        # Prometheus applies discovered targets on a 5 s tick: the first scrape comes seconds after it is ready.
        # The data, and the time range views of it use, start there.
        if self.wait_scraped(ready, wait_s):
            self.meta["started_at"] = time.time() - SCRAPE_INTERVAL_S
            write_json_atomic(self.meta_file, self.meta)
        return self

    def refresh_targets(self) -> bool:
        """Rewrite ``targets.json`` when the run's endpoints changed; cheap enough to call every progress tick."""
        targets = run_targets(self.run_dir, getattr(self.stack, "endpoints", None))
        if targets == self._targets and self.targets_file.exists():
            return False
        self._targets = targets
        write_json_atomic(self.targets_file, file_sd(targets))
        if self.meta:
            self.meta["targets"] = targets
            write_json_atomic(self.meta_file, self.meta)
        return True

    def wait_scraped(self, after: float, timeout: float) -> bool:
        """Wait until Prometheus scraped every known target successfully at or after ``after`` (Unix seconds)."""
        deadline = time.monotonic() + timeout
        want = {t["url"] for t in self._targets.values()}
        while True:
            if self._scraped_since(after, want):
                return True
            if time.monotonic() > deadline:
                log.warning("Prometheus had not scraped every endpoint within %.0fs; its targets: %s", timeout,
                            self._target_states())
                return False
            time.sleep(0.2)

    def _scraped_since(self, after: float, want: set[str]) -> bool:
        try:
            active = self.server.targets()
        except Exception:  # noqa: BLE001 - not answering yet
            return False
        done = set()
        for target in active:
            url = target.get("scrapeUrl", "")
            last = _parse_rfc3339(target.get("lastScrape", ""))
            if target.get("health") == "up" and last is not None and last >= after:
                done.add(url)
        return want <= done

    def _target_states(self) -> list[str]:
        try:
            return [f"{t.get('scrapeUrl')}: {t.get('health')} {t.get('lastError') or ''}".strip()
                    for t in self.server.targets()]
        except Exception as exc:  # noqa: BLE001
            return [f"(targets unavailable: {exc})"]

    def finish(self, wait_s: float = 10.0) -> None:
        """A last scrape of every endpoint, then stop; ``meta.json`` gets ``stopped_at``. Safe to call twice."""
        if self.server is None:
            return
        scraped_at = None
        try:
            if self.server.running():
                self.refresh_targets()
                self.wait_scraped(time.time(), wait_s)
                scraped_at = time.time()
                # A scrape still being written when Prometheus gets SIGTERM is stored as failed (up 0, the target's
                # series marked stale). Let every scrape begun by now finish (scrape_timeout is the interval); the
                # data ends where the final scrapes were seen, so one cut short by the shutdown lies after it.
                time.sleep(SCRAPE_INTERVAL_S)
        finally:
            self.server.stop()
            self.server = None
            self.meta["stopped_at"] = scraped_at or time.time()
            self.meta.pop("url", None)
            write_json_atomic(self.meta_file, self.meta)


_RFC3339 = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")


def _parse_rfc3339(text: str) -> float | None:
    """Prometheus' ``lastScrape`` (``2024-01-02T03:04:05.123456789Z``, nanoseconds, maybe an offset) as Unix
    seconds; None for "never" (Go's zero time) or anything else."""
    from datetime import datetime

    match = _RFC3339.match(text or "")
    if not match or text.startswith("0001-"):
        return None
    whole, fraction, zone = match.groups()
    zone = "+00:00" if zone == "Z" else zone
    return datetime.fromisoformat(whole + zone).timestamp() + float("0." + (fraction or "0"))


# --- a stored run ----------------------------------------------------------------------------------------------------
class StoredRun:
    """The time range and targets of a run's Prometheus data (``RUN_DIR/prometheus/meta.json``)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / DIR_NAME
        data = self.dir / "data"
        if not self.run_dir.is_dir():
            raise StoredRunError(f"{self.run_dir} is not a directory; give the run directory of a "
                                    "`loadlab run --prometheus`.")
        if not data.is_dir():
            raise StoredRunError(f"{self.run_dir} holds no Prometheus data ({data} is missing); "
                                    "record one with `loadlab run --prometheus`.")
        try:
            self.meta = json.loads((self.dir / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.meta = {}
        self.data_dir = data
        self.scrape_interval_s = float(self.meta.get("scrape_interval_s") or SCRAPE_INTERVAL_S)
        self.start = float(self.meta.get("started_at") or self._data_mtime(oldest=True))
        # a run that died before finish() has no stopped_at: the newest write to the TSDB is as good
        self.end = float(self.meta.get("stopped_at") or self._data_mtime(oldest=False))
        if not math.isfinite(self.start) or self.end <= self.start:
            raise StoredRunError(f"{self.dir / 'meta.json'}: no usable time range ({self.start} .. {self.end})")

    def _data_mtime(self, oldest: bool) -> float:
        times = [p.stat().st_mtime for p in self.data_dir.rglob("*") if p.is_file()]
        if not times:
            return float("nan")
        return min(times) if oldest else max(times)


@contextmanager
def open_run(run_dir: Path, *, timeout: float = STARTUP_TIMEOUT_S) -> Iterator[tuple[Prometheus, StoredRun]]:
    """Serve a run's stored TSDB for queries: a copy in a temporary directory (the run directory is only read),
    no scraping, no rules, on a free loopback port. The command line names the run directory
    (``--web.page-title``), so a leftover process is attributable to it."""
    stored = StoredRun(run_dir)
    binary()  # PrometheusMissing before any copying
    with tempfile.TemporaryDirectory(prefix="loadlab-prometheus-") as tmp:
        data = Path(tmp) / "data"
        shutil.copytree(stored.data_dir, data, ignore=shutil.ignore_patterns("lock", "queries.active"))
        config = Path(tmp) / "prometheus.yml"
        config.write_text(yaml.safe_dump(scrape_config(None)), encoding="utf-8")
        server = Prometheus(config, data, Path(tmp) / "prometheus.log", retention=RETENTION,
                            title=f"loadlab run {Path(run_dir).resolve()}")
        server.start(timeout)
        try:
            yield server, stored
        finally:
            server.stop()
