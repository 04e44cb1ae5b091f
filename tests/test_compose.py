"""docker-compose.yml without a Docker engine: valid against the Compose Specification, every command a real entry
point, every mounted file present, every config consistent with the services it names, Prometheus config accepted by
promtool.

External inputs (promtool, the not-yet-written modules a command names) skip
when absent, unless ``LOADLAB_REQUIRE_SERVICES=1`` (CI), where their absence is a failure.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"  # see tests/data/README.md
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus.yml"

# Executables our own image may run (console scripts of loadlab and its dependencies).
APP_EXECUTABLES = {"loadlab", "celery", "locust"}
LOADLAB_SUBCOMMANDS = {"api", "worker", "exporter"}
CELERY_SUBCOMMANDS = {"worker", "flower"}
# Image-only services may pass flags to the image's entrypoint, or run one of the image's own programs.
IMAGE_EXECUTABLES = {"redis": {"redis-server"}, "rabbitmq": {"rabbitmq-server"}}
# Values of these variables are secrets: they must come from the environment with no default in the compose file.
SECRET_VARS = {"RABBITMQ_PASSWORD", "FLOWER_BASIC_AUTH", "GF_SECURITY_ADMIN_PASSWORD"}

_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")


def missing(what: str) -> NoReturn:
    """Skip for a missing external input, or fail in CI where everything must be present."""
    if os.environ.get("LOADLAB_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{what} (required because LOADLAB_REQUIRE_SERVICES=1)")
    pytest.skip(what)


@pytest.fixture(scope="module")
def raw() -> str:
    return COMPOSE_FILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def compose(raw: str) -> dict[str, Any]:
    doc = yaml.safe_load(raw)
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict)
    return doc


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def command_of(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command")
    if cmd is None:
        return []
    # The string form is split like a shell would (compose does the same); the list form is taken as is.
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def is_app(service: dict[str, Any]) -> bool:
    return "build" in service


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path as written, container path) of every bind mount of a service."""
    out: list[tuple[str, str]] = []
    for vol in service.get("volumes", []):
        if isinstance(vol, str):
            parts = vol.split(":")
            if len(parts) >= 2 and parts[0].startswith((".", "/", "~")):
                out.append((parts[0], parts[1]))
        elif vol.get("type") == "bind":
            out.append((vol["source"], vol["target"]))
    return out


def host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """The repository file a container path of a service comes from, through its bind mounts (longest prefix wins)."""
    best: tuple[str, str] | None = None
    for src, dst in bind_mounts(service):
        if container_path == dst or container_path.startswith(dst.rstrip("/") + "/"):
            if best is None or len(dst) > len(best[1]):
                best = (src, dst)
    if best is None:
        return None
    rest = container_path[len(best[1]):].lstrip("/")
    return (ROOT / best[0] / rest).resolve() if rest else (ROOT / best[0]).resolve()


def flag_value(cmd: list[str], flag: str) -> str | None:
    for i, arg in enumerate(cmd):
        if arg == flag and i + 1 < len(cmd):
            return cmd[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


# --- the schema ------------------------------------------------------------------------------------------------------

def test_valid_against_compose_spec(compose: dict[str, Any]):
    if not SCHEMA.exists():
        missing(f"compose schema not found at {SCHEMA}")
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:20])


def test_the_stack_has_every_service(compose: dict[str, Any]):
    names = set(services(compose))
    assert {"rabbitmq", "redis", "api", "worker", "exporter", "flower", "prometheus", "grafana", "otel-collector",
            "jaeger", "locust-master", "locust-worker"} <= names


# --- commands --------------------------------------------------------------------------------------------------------

def test_commands_are_known_entry_points(compose: dict[str, Any]):
    scripts = {ep.name for ep in importlib.metadata.entry_points(group="console_scripts")}
    for name, svc in services(compose).items():
        cmd = command_of(svc)
        assert "entrypoint" not in svc, f"{name}: overriding the entrypoint hides which program runs"
        if is_app(svc):
            assert cmd, f"{name}: our image needs an explicit command"
            exe = cmd[0]
            assert exe in APP_EXECUTABLES, f"{name}: {exe!r} is not one of {sorted(APP_EXECUTABLES)}"
            assert exe in scripts, f"{name}: no installed console script {exe!r} (is the project installed?)"
            if exe == "loadlab":
                assert cmd[1] in LOADLAB_SUBCOMMANDS, f"{name}: loadlab {cmd[1]!r}"
            elif exe == "celery":
                app = flag_value(cmd, "-A")
                assert app and re.fullmatch(r"[\w.]+:\w+", app), f"{name}: celery needs -A module:attr"
                assert any(c in CELERY_SUBCOMMANDS for c in cmd), f"{name}: celery subcommand"
            elif exe == "locust":
                assert flag_value(cmd, "-f"), f"{name}: locust needs -f LOCUSTFILE"
                assert ("--master" in cmd) or ("--worker" in cmd and flag_value(cmd, "--master-host")), name
        elif cmd:
            image = svc["image"].split(":")[0]
            own = IMAGE_EXECUTABLES.get(image.rsplit("/", 1)[-1], set())
            assert cmd[0].startswith("-") or cmd[0] in own, f"{name}: {cmd[0]!r} is not {image}'s own program"


def test_exporter_is_pointed_at_the_broker(compose: dict[str, Any]):
    cmd = command_of(services(compose)["exporter"])
    assert cmd[:2] == ["loadlab", "exporter"]
    broker = flag_value(cmd, "--broker")
    assert broker and broker.startswith("amqp://") and "@rabbitmq:5672" in broker


def _referenced_modules(compose: dict[str, Any]) -> list[tuple[str, Path]]:
    refs: list[tuple[str, Path]] = []
    for name, svc in services(compose).items():
        cmd = command_of(svc)
        if cmd[:1] == ["celery"]:
            module = (flag_value(cmd, "-A") or "").split(":")[0]
            spec = importlib.util.find_spec(module) if module.startswith("loadlab.") else None
            refs.append((name, Path(spec.origin) if spec and spec.origin else ROOT / (module.replace(".", "/") + ".py")))
        elif cmd[:1] == ["locust"]:
            refs.append((name, ROOT / (flag_value(cmd, "-f") or "")))
    return refs


def test_files_named_by_commands_exist(compose: dict[str, Any]):
    refs = _referenced_modules(compose)
    assert refs
    absent = sorted({str(p.relative_to(ROOT)) for _, p in refs if not p.is_file()})
    if absent:
        missing(f"not written yet: {', '.join(absent)}")


def test_loadlab_subcommands_exist(compose: dict[str, Any]):
    """Ask the real CLI: `loadlab <sub> --help` must succeed, and the exporter must take --broker."""
    exe = shutil.which("loadlab", path=str(Path(sys.executable).parent)) or shutil.which("loadlab")
    if exe is None:
        missing("the loadlab CLI is not installed beside this interpreter")
    not_yet: list[str] = []
    for name, svc in services(compose).items():
        cmd = command_of(svc)
        if cmd[:1] != ["loadlab"]:
            continue
        proc = subprocess.run([exe, cmd[1], "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
        if "No such command" in proc.stderr:
            not_yet.append(f"loadlab {cmd[1]} ({name})")
            continue
        assert proc.returncode == 0, f"{name}: `loadlab {cmd[1]} --help` failed: {proc.stderr[-500:]}"
        for flag in (a for a in cmd[2:] if a.startswith("--")):
            assert flag.split("=")[0] in proc.stdout, f"{name}: `loadlab {cmd[1]}` has no {flag}"
    if not_yet:
        missing(f"the CLI has no {', '.join(not_yet)} yet")


# --- scaling, health, mounts -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["worker", "locust-worker"])
def test_scalable_services_have_no_fixed_name_or_host_port(compose: dict[str, Any], name: str):
    svc = services(compose)[name]
    assert "container_name" not in svc, f"{name}: container_name prevents --scale"
    assert not svc.get("ports"), f"{name}: a fixed host port prevents --scale"


def test_depends_on_waits_for_health(compose: dict[str, Any]):
    svcs = services(compose)
    waited = 0
    for name, svc in svcs.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: use the long depends_on form with a condition"
        for dep, spec in deps.items():
            assert dep in svcs, f"{name} depends on unknown service {dep}"
            if spec["condition"] == "service_healthy":
                waited += 1
                check = svcs[dep].get("healthcheck")
                assert check and not check.get("disable") and check.get("test"), f"{dep} has no healthcheck"
    assert waited >= 5
    for name in ("rabbitmq", "redis", "api", "worker", "prometheus"):
        assert svcs[name].get("healthcheck"), f"{name} needs a healthcheck"


def test_bind_mounted_paths_exist(compose: dict[str, Any]):
    declared = set(compose.get("volumes") or {})
    mounts = 0
    for name, svc in services(compose).items():
        for src, _ in bind_mounts(svc):
            mounts += 1
            assert (ROOT / src).exists(), f"{name}: mounts {src}, which is not in the repository"
        for vol in svc.get("volumes", []):
            if isinstance(vol, str) and not vol.startswith((".", "/", "~")):
                assert vol.split(":")[0] in declared, f"{name}: named volume {vol} is not declared"
    assert mounts >= 5


def test_configs_resolve_through_the_mounts(compose: dict[str, Any]):
    svcs = services(compose)
    # Prometheus: the config file, and its rule files relative to it, inside the container.
    prom = svcs["prometheus"]
    config = flag_value(command_of(prom), "--config.file")
    assert config and host_path(prom, config) == PROMETHEUS_CONFIG.resolve()
    rule_files = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))["rule_files"]
    assert rule_files
    for rule_file in rule_files:
        in_container = posixpath.normpath(posixpath.join(posixpath.dirname(config), rule_file))
        source = host_path(prom, in_container)
        assert source is not None and source.is_file(), f"rule file {rule_file} is not mounted at {in_container}"
        assert source == (ROOT / "dashboards" / "alerts" / "celery.rules.yml").resolve()
    # Grafana: provisioning, the dashboards folder the provider reads, the home dashboard.
    graf = svcs["grafana"]
    provisioning = host_path(graf, "/etc/grafana/provisioning")
    assert provisioning == (ROOT / "deploy" / "grafana" / "provisioning").resolve()
    providers = yaml.safe_load((provisioning / "dashboards" / "loadlab.yml").read_text(encoding="utf-8"))["providers"]
    for provider in providers:
        folder = host_path(graf, provider["options"]["path"])
        assert folder == (ROOT / "dashboards" / "json").resolve() and any(folder.glob("*.json"))
    home = graf["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert (source := host_path(graf, home)) is not None and source.is_file(), home
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text(encoding="utf-8"))
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    # OpenTelemetry Collector: its config, and the Jaeger it exports to.
    otel = svcs["otel-collector"]
    otel_config = host_path(otel, flag_value(command_of(otel), "--config") or "")
    assert otel_config == (ROOT / "deploy" / "otel-collector.yml").resolve()
    collector = yaml.safe_load(otel_config.read_text(encoding="utf-8"))
    assert "otlp" in collector["receivers"]
    for exporter in collector["service"]["pipelines"]["traces"]["exporters"]:
        host = collector["exporters"][exporter]["endpoint"].split("//")[-1].split(":")[0]
        assert host in svcs, f"collector exports to unknown host {host}"


# --- secrets and .env.example ----------------------------------------------------------------------------------------

def test_secrets_come_from_the_environment_without_defaults(raw: str, compose: dict[str, Any]):
    used = {m.group(1): m for m in _INTERPOLATION.finditer(raw)}
    for var in SECRET_VARS:
        assert var in used, f"{var} is not used"
    for match in _INTERPOLATION.finditer(raw):
        if match.group(1) in SECRET_VARS:
            assert match.group(2) in (None, ":?", "?"), f"${{{match.group(1)}}} must not have a default"
    envs = [svc.get("environment", {}) for svc in services(compose).values()]
    assert any(env.get("FLOWER_BASIC_AUTH", "").startswith("${FLOWER_BASIC_AUTH") for env in envs)
    assert services(compose)["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith(
        "${GF_SECURITY_ADMIN_PASSWORD")


def test_env_example_lists_every_variable(raw: str):
    example = ROOT / ".env.example"
    values = {}
    for line in example.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    used = {m.group(1) for m in _INTERPOLATION.finditer(raw)}
    assert used - set(values) == set(), "variables used by docker-compose.yml but not in .env.example"
    for var in SECRET_VARS:
        assert "change-me" in values[var], f".env.example must hold a placeholder for {var}, not a secret"


# --- Prometheus ------------------------------------------------------------------------------------------------------

def test_prometheus_config_passes_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        missing("promtool not installed (apt-get install prometheus)")
    proc = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheus_scrapes_the_services_on_their_ports(compose: dict[str, Any]):
    svcs = services(compose)
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    scraped: dict[str, set[int]] = {}
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                scraped.setdefault(host, set()).add(int(port))
        for dns in job.get("dns_sd_configs", []):
            for host in dns["names"]:
                scraped.setdefault(host, set()).add(int(dns["port"]))
    scraped.pop("localhost", None)
    for host in scraped:
        assert host in svcs, f"Prometheus scrapes {host}, which is not a compose service"
    for needed in ("api", "worker", "exporter", "flower"):
        assert needed in scraped, f"Prometheus does not scrape {needed}"
    # The port Prometheus scrapes is the one the service is told to listen on.
    for host, ports in scraped.items():
        env = svcs[host].get("environment", {})
        told = {int(env[k]) for k in ("LOADLAB_METRICS_PORT", "LOADLAB_API_PORT") if k in env}
        if told:
            assert ports & told, f"{host}: scraped on {ports}, but it listens on {told}"
