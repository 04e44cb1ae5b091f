"""docker-compose.yml under a real Docker engine (issue 23). Not part of ``make test`` (pyproject's norecursedirs):
``.ci/run`` runs it on its own after the suite, as ``pytest tests/engine/test_engine.py``.

The images come from deploy/images/build.py (a Debian base from debootstrap, Redis, RabbitMQ and Prometheus from
Debian's packages, the project image on that base; cached by a hash of their inputs). The stack is
docker-compose.yml + deploy/compose.local-images.yml (the local images) + tests/engine/compose.engine.yml (one run
ledger, headless Locust writing a report), under a project name of its own, with every published port on a free
port of 127.0.0.1. Grafana, Jaeger and the OpenTelemetry Collector are left out: no registry this machine reaches has
their images. The tests run in order on one stack: headless Locust report, Prometheus targets and dashboard queries,
Flower's login, ``--scale worker=3``, and last ``down -v`` leaving nothing of the project behind.

Without docker, docker-compose or debootstrap the tests skip, or fail under ``LOADLAB_REQUIRE_SERVICES=1`` (CI).
The engine: the one at DOCKER_HOST (or the default socket) when it answers, else a dockerd of its own, stopped at
the end (data in /var/lib/loadlab-docker, which keeps the image cache between runs).
"""
from __future__ import annotations

import base64
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from loadlab.dashboards.promql import metric_names, probes
from loadlab.dashboards.queries import RULES_UID, all_queries
from tests.conftest import REPO, REQUIRE_SERVICES, unique, wait_until

pytestmark = pytest.mark.timeout(2400)

LEFT_OUT = ("grafana", "jaeger", "otel-collector")
SERVICES = ("rabbitmq", "redis", "api", "worker", "exporter", "flower", "prometheus")
LOCUST_SERVICES = ("locust-master", "locust-worker")
COMPOSE_FILES = (REPO / "docker-compose.yml", REPO / "deploy" / "compose.local-images.yml",
                 Path(__file__).with_name("compose.engine.yml"))
OWN_DOCKERD = Path("/run/loadlab-dockerd")
OWN_DATA_ROOT = "/var/lib/loadlab-docker"
HOST_PORTS = ("AMQP", "RABBITMQ_MANAGEMENT", "API", "FLOWER", "PROMETHEUS", "GRAFANA", "JAEGER", "LOCUST")
# Every scrape job of deploy/prometheus.yml, with the stack as started here (rabbitmq: its Prometheus plugin).
JOBS = {"prometheus", "api", "worker", "exporter", "flower", "locust", "rabbitmq"}
# The scale check: a backlog of CPU-bound tasks, one pool process per worker (2 cores: 3 processes use both, 1 one).
CPU_TASKS, CPU_MS = 300, 20
LOCUST_USERS, LOCUST_RUN_S = 4, 40
# Metrics the exporter serves for Redis brokers only (exporters/exporter_service.py: RabbitMQ tells no unacked count
# over AMQP); the compose's broker is RabbitMQ, so a query naming only these may return no data.
REDIS_BROKER_ONLY = {"celery_queue_unacked"}


def log(message: str) -> None:
    print(f"[engine] {message}", flush=True)


def missing(what: str):
    if REQUIRE_SERVICES:
        pytest.fail(f"{what} (LOADLAB_REQUIRE_SERVICES=1)")
    pytest.skip(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def docker_answers(env: dict) -> bool:
    return subprocess.run(["docker", "info"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          timeout=30).returncode == 0


@pytest.fixture(scope="module")
def engine():
    """The environment of docker commands: an engine that answers (ours when none did, stopped afterwards)."""
    for tool in ("docker", "dockerd", "docker-compose", "debootstrap"):
        if shutil.which(tool) is None:
            missing(f"{tool} is not installed (apt-get install docker.io docker-compose debootstrap)")
    env = dict(os.environ)
    started = None
    if not docker_answers(env):
        OWN_DOCKERD.mkdir(parents=True, exist_ok=True)
        env["DOCKER_HOST"] = f"unix://{OWN_DOCKERD}/docker.sock"
        if not docker_answers(env):
            log_path = OWN_DOCKERD / "dockerd.log"
            log(f"starting dockerd (socket {env['DOCKER_HOST']}, log {log_path})")
            started = subprocess.Popen(
                ["dockerd", "--host", env["DOCKER_HOST"], "--data-root", OWN_DATA_ROOT,
                 "--exec-root", str(OWN_DOCKERD / "exec"), "--pidfile", str(OWN_DOCKERD / "dockerd.pid")],
                stdout=log_path.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
            try:
                wait_until(lambda: started.poll() is not None or docker_answers(env), 60, 0.5, "dockerd to answer")
            except AssertionError:
                pass
            if started.poll() is not None or not docker_answers(env):
                tail = log_path.read_text(errors="replace")[-2000:]
                stop_dockerd(started)
                missing(f"dockerd did not start; last lines of {log_path}:\n{tail}")
    server = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], env=env, capture_output=True,
                            text=True).stdout.strip()
    compose = subprocess.run(["docker-compose", "version", "--short"], env=env, capture_output=True,
                             text=True).stdout.strip()
    log(f"Docker engine {server}, docker-compose {compose}")
    yield env
    if started is not None:
        stop_dockerd(started)


def stop_dockerd(process: subprocess.Popen) -> None:
    log("stopping the dockerd this test started")
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def images(engine) -> dict:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "deploy" / "images" / "build.py")], env=engine,
                          capture_output=True, text=True, timeout=1800)
    sys.stdout.write(proc.stderr[-3000:] if proc.returncode == 0 else proc.stderr[-20000:])
    assert proc.returncode == 0, f"deploy/images/build.py failed:\n{proc.stdout[-2000:]}"
    found = dict(line.split("=", 1) for line in proc.stdout.split())
    log(f"images ready in {time.monotonic() - started:.1f}s: " + ", ".join(found.values()))
    return found


class Compose:
    def __init__(self, env: dict, project: str, run_dir: Path):
        self.project = project
        self.ports = {name: free_port() for name in HOST_PORTS}
        self.password = unique("rabbit")
        self.flower_auth = ("engine", unique("flower"))
        self.env = {**env, "RABBITMQ_PASSWORD": self.password, "FLOWER_BASIC_AUTH": ":".join(self.flower_auth),
                    "GF_SECURITY_ADMIN_PASSWORD": unique("grafana"), "LOADLAB_PUBLISH_ADDR": "127.0.0.1",
                    # one pool process per worker: scaling the service is what adds CPU (see CPU_TASKS)
                    "LOADLAB_CONCURRENCY": "1", "LOADLAB_TRACING": "off",
                    "ENGINE_RUN_ID": project, "ENGINE_RUN_DIR": str(run_dir),
                    "ENGINE_LOCUST_USERS": str(LOCUST_USERS), "ENGINE_LOCUST_RUN_TIME": f"{LOCUST_RUN_S}s",
                    **{f"HOST_PORT_{name}": str(port) for name, port in self.ports.items()}}

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        command = ["docker-compose", "--project-directory", str(REPO), "-p", self.project]
        for path in COMPOSE_FILES:
            command += ["-f", str(path)]
        proc = subprocess.run(command + list(args), env=self.env, capture_output=True, text=True, timeout=timeout,
                              cwd=REPO)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return proc

    def docker(self, *args: str) -> str:
        return subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True, check=True,
                              timeout=120).stdout

    def own(self, kind: str) -> list[str]:
        """Names of the containers, networks or volumes labelled with this project."""
        listing = ["container", "ls", "-a"] if kind == "container" else [kind, "ls"]
        out = self.docker(*listing, "--filter", f"label=com.docker.compose.project={self.project}",
                          "--format", "{{.Names}}" if kind == "container" else "{{.Name}}")
        return out.split()

    def url(self, name: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}{path}"

    def prometheus(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(self.url("PROMETHEUS", path) + (f"?{query}" if query else ""), timeout=30) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def logs(self, *services: str, tail: int = 60) -> str:
        return self("logs", "--no-color", "--tail", str(tail), *services, check=False).stdout[-12000:]


@pytest.fixture(scope="module")
def stack(engine, images, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("engine-runs")
    run_dir.chmod(0o777)  # the image's processes run as uid 10001
    compose = Compose({**engine, **images}, f"loadlab-engine-{unique('p')}".replace("_", "-").lower(), run_dir)
    compose.run_dir = run_dir
    log(f"compose project {compose.project}; left out (no image on the registries this machine reaches): "
        f"{', '.join(LEFT_OUT)}; published ports on 127.0.0.1: "
        + ", ".join(f"{k.lower()} {v}" for k, v in compose.ports.items()))
    started = time.monotonic()
    try:
        compose("up", "-d", "--no-build", *SERVICES, timeout=900)
        wait_until(lambda: healthy(compose, SERVICES), 240, 2, "every service healthy")
        log(f"stack up and healthy in {time.monotonic() - started:.1f}s")
        yield compose
    except BaseException:
        log("stack failed; logs:\n" + compose.logs())
        raise
    finally:
        compose("down", "-v", "--remove-orphans", "--timeout", "20", timeout=300, check=False)


def healthy(compose: Compose, services) -> bool:
    states = {}
    for name in compose.own("container"):
        state = json.loads(compose.docker("inspect", "--format", "{{json .State}}", name))
        service = compose.docker("inspect", "--format", '{{index .Config.Labels "com.docker.compose.service"}}',
                                 name).strip()
        if state.get("Status") == "exited" and service in services:
            raise AssertionError(f"{name} exited ({state.get('ExitCode')}):\n{compose.logs(service)}")
        health = state.get("Health", {}).get("Status", state.get("Status"))
        states.setdefault(service, []).append(health)
    # every service named has a healthcheck in docker-compose.yml: each of its containers must pass it
    return all(service in states and all(h == "healthy" for h in states[service]) for service in services)


def workers_up(compose: Compose) -> int:
    result = compose.prometheus("/api/v1/query", query='sum(celery_worker_up{job="exporter"})')["result"]
    return int(float(result[0]["value"][1])) if result else 0


def cpu_rate(compose: Compose) -> float:
    """Completed CPU-bound tasks per second: a backlog of CPU_TASKS published at once, timed until the last result."""
    script = ("import sys, time\n"
              "from loadlab.config.settings import Settings\n"
              "from loadlab.stack.app import make_app\n"
              "app = make_app(Settings.from_env())\n"
              "started = time.monotonic()\n"
              f"results = [app.send_task('loadlab.cpu', kwargs={{'ms': {CPU_MS}}}) for _ in range({CPU_TASKS})]\n"
              "for result in results: result.get(timeout=600)\n"
              "print(f'{len(results) / (time.monotonic() - started):.3f}')\n")
    proc = compose("run", "--rm", "--no-deps", "-T", "-e", "LOADLAB_LEDGER_URL=", "api", "python", "-c", script,
                   timeout=900)
    return float(proc.stdout.split()[-1])


# --- the checks, in order on one stack ---------------------------------------------------------------------------------
LOAD = {}


def test_headless_locust_in_the_compose_services_reports_no_lost_task(stack):
    compose = stack
    compose("up", "-d", "--no-build", *LOCUST_SERVICES, timeout=600)
    master = f"{compose.project}_locust-master_1"
    started = time.time()
    # while the load runs: every scrape target of deploy/prometheus.yml up, the Locust ones included
    targets = wait_until(lambda: all_targets_up(compose), 90, 2, "every Prometheus scrape target up")
    LOAD["targets"] = targets
    log("Prometheus targets during the load: " + ", ".join(f"{job}×{n} up" for job, n in sorted(targets.items())))
    wait_until(lambda: json.loads(compose.docker("inspect", "--format", "{{json .State}}", master))["Status"]
               == "exited", LOCUST_RUN_S + 180, 2, "the headless Locust master to finish")
    LOAD["window"] = (started, time.time())
    report_path = compose.run_dir / "compose-run" / "report.json"
    if not report_path.is_file():
        master_log = compose.run_dir / "locust-master.log"
        master_log.write_text(compose("logs", "--no-color", "locust-master", check=False).stdout)
        text = master_log.read_text()
        raise AssertionError(f"no report.json from the Locust master (its log: {master_log}); its errors:\n"
                             + text[text.find("Uncaught exception"):][:6000])
    report = json.loads(report_path.read_text())
    tasks = report["tasks"]
    log(f"report ledger: {json.dumps(tasks)}; completed/s {report['throughput']['completed_per_s']}; "
        f"locust requests {report['locust']['requests']}, request failures {report['locust']['request_failures']}")
    assert tasks["submitted"] > 0 and tasks["lost"] == 0, tasks
    assert tasks["succeeded"] + tasks["failed"] + tasks.get("revoked", 0) + tasks["lost"] == tasks["submitted"]
    assert report["locust"]["request_failures"] == 0, report["locust"]
    assert (compose.run_dir / "compose-run" / "report.html").is_file()


def all_targets_up(compose: Compose) -> dict | None:
    active = compose.prometheus("/api/v1/targets", state="active")["activeTargets"]
    by_job: dict[str, list[str]] = {}
    for target in active:
        by_job.setdefault(target["labels"]["job"], []).append(target["health"])
    if set(by_job) != JOBS or not all(h == "up" for healths in by_job.values() for h in healths):
        return None
    if len(by_job["locust"]) < 2:  # the master and the worker
        return None
    return {job: len(healths) for job, healths in by_job.items()}


def test_prometheus_answers_every_dashboard_query_with_data(stack):
    assert "window" in LOAD, "the Locust load did not run"
    start, end = LOAD["window"]
    problems, redis_only, checked = [], [], 0
    for query in all_queries():
        exprs = [query.expr] if query.uid != RULES_UID else list(probes(query.expr))
        for expr in exprs:
            checked += 1
            try:
                result = stack.prometheus("/api/v1/query_range", query=expr, start=start, end=end, step=2)["result"]
            except urllib.error.HTTPError as exc:
                problems.append(f"{query.uid}: {query.title!r}: {expr!r} does not evaluate: {exc.read()[:300]!r}")
                continue
            if not any(math.isfinite(float(v)) for series in result for _t, v in series["values"]):
                if metric_names(expr) <= REDIS_BROKER_ONLY:
                    redis_only.append(expr)
                else:
                    problems.append(f"{query.uid}: {query.title!r}: {expr!r} returned no data")
    log(f"{checked} dashboard queries and alert probes evaluated over the load's window: {len(problems)} without "
        f"data; {len(redis_only)} of a Redis-broker-only metric, empty with RabbitMQ as expected: {redis_only}")
    assert not problems, "\n".join(problems)


def test_flower_takes_its_credentials_from_the_environment(stack):
    url = stack.url("FLOWER", "/api/workers")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)
    assert refused.value.code == 401
    token = base64.b64encode(":".join(stack.flower_auth).encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        assert isinstance(json.load(response), dict)
    wrong = urllib.request.Request(url, headers={"Authorization": "Basic " + base64.b64encode(b"engine:x").decode()})
    with pytest.raises(urllib.error.HTTPError) as refused_wrong:
        urllib.request.urlopen(wrong, timeout=10)
    assert refused_wrong.value.code == 401
    log("Flower: 401 without credentials and with a wrong password, 200 with FLOWER_BASIC_AUTH's")


def test_scaling_the_workers_to_three_completes_more_cpu_tasks_per_second(stack):
    wait_until(lambda: workers_up(stack) == 1, 60, 2, "one worker up in the exporter's metrics")
    one = cpu_rate(stack)
    stack("up", "-d", "--no-build", "--no-recreate", "--scale", "worker=3", *SERVICES, timeout=600)
    wait_until(lambda: healthy(stack, ("worker",)) and len([n for n in stack.own("container") if "_worker_" in n]) == 3,
               180, 2, "three healthy workers")
    up = wait_until(lambda: workers_up(stack) == 3 and 3, 90, 2, "three workers up in the exporter's metrics")
    three = cpu_rate(stack)
    log(f"scale: {up} workers up in the exporter's metrics; {CPU_TASKS} cpu tasks of {CPU_MS} ms: "
        f"1 worker {one:.1f}/s, 3 workers {three:.1f}/s, ratio {three / one:.2f}")
    assert three > one * 1.1, f"3 workers {three:.1f}/s is not more than 1 worker {one:.1f}/s"


def test_down_leaves_no_container_network_or_volume(stack):
    assert stack.own("volume"), "the stack made no volume to remove (prometheus-data, rabbitmq-data)"
    stack("down", "-v", "--remove-orphans", "--timeout", "20", timeout=300)
    left = {kind: stack.own(kind) for kind in ("container", "network", "volume")}
    log(f"after down -v: {left}")
    assert not any(left.values()), left
