"""The one settings object of loadlab.

Precedence: defaults (here) <- ``LOADLAB_*`` environment <- CLI flags. The CLI builds a ``Settings`` and hands it to
every child process (workers, API, exporter, Locust) as JSON in ``LOADLAB_SETTINGS_JSON``; a child rebuilds it with
``Settings.from_env()``, so no process carries defaults of its own.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SETTINGS_ENV = "LOADLAB_SETTINGS_JSON"
# LOADLAB_* variables that are not settings: the settings hand-off to children, the compose file's publish address,
# and the test suite's switches. Any other LOADLAB_* name that is not a setting is a typo, refused up front.
OTHER_VARIABLES = {SETTINGS_ENV, "LOADLAB_PUBLISH_ADDR", "LOADLAB_REQUIRE_SERVICES", "LOADLAB_ARTIFACTS_DIR"}

Serializer = Literal["json", "msgpack", "yaml", "pickle"]
Compression = Literal["none", "zlib", "bzip2", "lzma", "zstd"]
Pool = Literal["prefork", "threads", "solo", "gevent"]
Tracing = Literal["off", "sampled", "all"]
OnOff = Literal["on", "off"]

BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "pyamqp")
BACKEND_SCHEMES = ("redis", "rediss", "db+sqlite", "db+postgresql", "db+postgresql+psycopg2", "db+mysql", "rpc")

CHAOS_VISIBILITY_TIMEOUT_S = 10
_QUEUE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
_DURATION_RE = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s?)?$")


class SettingsError(ValueError):
    """A user-facing configuration error: one sentence naming the bad value and what is accepted."""


def parse_duration(text: str | float | int, name: str = "duration") -> float:
    """Locust-style durations: ``30s``, ``2m``, ``1h30m`` or plain seconds."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        raw = str(text).strip()
        match = _DURATION_RE.match(raw)
        if not raw or not match or not any(match.groups()):
            raise SettingsError(f"{name} {text!r} is not a duration; use a positive number of seconds or forms like 30s, 2m, 1h30m.")
        hours, minutes, secs = match.groups()
        seconds = int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(secs or 0)
    if seconds <= 0:
        raise SettingsError(f"{name} {text!r} must be greater than zero; use forms like 30s, 2m, 1h30m.")
    return seconds


# --chaos faults: the plan is a setting (validated with the others); ``loadlab.stack.chaos`` applies it.
FAULTS = {
    "kill-worker-child": "SIGKILL one pool process of worker 1 (mid-task under load); the pool replaces it",
    "kill-worker": "SIGKILL worker 1 and its pool (on Redis: frozen first with the broker's writes paused, so the "
                   "kill cannot race a delivery); the stack starts it again",
    "restart-broker": "SIGKILL the embedded Redis broker and start it again on the same port",
    "restart-api": "SIGKILL the producer API and start it again",
    "kill-exporter": "SIGKILL the exporter service and start it again",
}


@dataclass
class Fault:
    kind: str
    at_s: float
    applied_at: float | None = None
    detail: str = ""
    recovered_s: float | None = None
    lost_ids: list[str] = field(default_factory=list)


def parse_plan(text: str) -> list[Fault]:
    """``kind@time,…`` -> faults in time order; a ValueError names the bad part and what is accepted."""
    faults = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        kind, _, when = part.partition("@")
        if kind not in FAULTS:
            raise ValueError(f"--chaos fault {kind!r} is not known; use one of {', '.join(FAULTS)}, as kind@time "
                             "(e.g. kill-worker@10s).")
        if not when:
            raise ValueError(f"--chaos fault {part!r} has no time; write it as {kind}@10s.")
        try:
            at_s = parse_duration(when, f"--chaos time of {kind}")
        except SettingsError as exc:
            raise ValueError(str(exc)) from None
        faults.append(Fault(kind, at_s))
    if not faults:
        raise ValueError(f"--chaos {text!r} names no fault; use e.g. kill-worker@10s,restart-broker@20s.")
    return sorted(faults, key=lambda f: f.at_s)


def mask_url(url: str | None) -> str | None:
    """Replace the password of a URL with ``***`` so it can be logged and saved."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment))


_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_RE = re.compile(rf"^(?=.{{1,253}}$){_HOST_LABEL}(?:\.{_HOST_LABEL})*$")


def _is_host(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return bool(_HOST_RE.match(value))


def _check_url(value: str | None, schemes: tuple[str, ...], option: str) -> str | None:
    if value is None or value == "":
        return None
    scheme = value.split("://", 1)[0] if "://" in value else ""
    if scheme not in schemes:
        raise ValueError(f"{option} {mask_url(value)!r} is not a supported URL; use one starting with "
                         + ", ".join(f"{s}://" for s in schemes) + ".")
    if scheme.startswith("db+sqlite"):
        return value
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        raise ValueError(f"{option} {mask_url(value)!r} is malformed ({exc}); use e.g. {schemes[0]}://127.0.0.1/0.") from None
    if scheme != "rpc" and not parts.hostname:
        raise ValueError(f"{option} {mask_url(value)!r} names no host; use e.g. {schemes[0]}://127.0.0.1/0.")
    return value


class Settings(BaseSettings):
    """Every knob of a loadlab stack and run. Field names are the CLI flags (``--prefetch-multiplier``) and the
    environment variables (``LOADLAB_PREFETCH_MULTIPLIER``)."""

    model_config = SettingsConfigDict(env_prefix="LOADLAB_", extra="forbid", validate_assignment=True,
                                      allow_inf_nan=False)

    # --- stack -------------------------------------------------------------------------------------------------
    broker: str | None = Field(None, description="Broker URL (redis://, amqp://); unset = embedded Redis")
    backend: str | None = Field(None, description="Result backend URL (redis://, db+sqlite:///, db+postgresql://); unset = embedded Redis or the broker's Redis")
    workers: int = Field(1, ge=1, le=64, description="Worker processes")
    concurrency: int = Field(2, ge=1, le=512, description="Pool size of each worker")
    pool: Pool = Field("prefork", description="Worker pool")
    prefetch_multiplier: int = Field(4, ge=0, le=1000, description="worker_prefetch_multiplier")
    acks_late: bool = Field(False, description="task_acks_late (with task_reject_on_worker_lost)")
    serializer: Serializer = Field("json", description="Task and result serializer")
    allow_pickle: bool = Field(False, description="Required to use --serializer pickle")
    compression: Compression = Field("none", description="Message compression")
    app: str | None = Field(None, description="Your own Celery app as module:attr (workers run it)")
    queue: str = Field("celery", pattern=r"^[A-Za-z0-9_.:-]{1,200}$", description="Queue the tasks go to and the workers consume")
    queues: str | None = Field(None, description="Queues the workers consume, comma-separated; unset = --queue plus "
                               "every queue the task mix and the app's task_queues and task_routes name")
    allow_foreign_consumers: bool = Field(False, description="Run even when a consumer that is not the run's "
                                          "(another worker, another app) already consumes one of its queues")
    tasks: str | None = Field(None, description="Task-mix YAML file of your app's tasks (`loadlab tasks` writes "
                              "one); replaces the scenario's mix")
    locustfile: str | None = Field(None, description="Your own locustfile (its User classes subclass "
                                   "loadlab.loadtests.api.CeleryUser), run in place of the scenario's users")
    tracing: Tracing = Field("off", description="OpenTelemetry tracing")
    trace_sample_ratio: float = Field(0.1, gt=0, le=1, description="Share of traces kept with --tracing sampled (parent-based)")
    otel_fast_paths: bool = Field(True, description="Tracing's fast paths beside the OpenTelemetry public API (each behind a probe of the installed version; off: the public API only)")
    metrics: OnOff = Field("on", description="Prometheus metrics")
    metrics_host: str = Field("127.0.0.1", description="Address the /metrics endpoints bind (containers need 0.0.0.0)")
    metrics_port: int = Field(0, ge=0, le=65535, description="/metrics port of a standalone process (0 = its default, or a free port inside the stack)")
    flower: bool = Field(False, description="Start Flower with the stack (bound to 127.0.0.1)")
    flower_port: int = Field(0, ge=0, le=65535, description="Flower's port (0 = a free port)")
    broker_persistence: bool = Field(False, description="Embedded broker keeps an append-only file (survives restarts)")
    visibility_timeout_s: int = Field(3600, ge=1, description="Redis broker: seconds before an unacknowledged task is redelivered (with --chaos and not given: 10, so redeliveries land within the drain)")
    chaos: str | None = Field(None, description="Faults to inject, e.g. kill-worker@10s,restart-broker@20s")
    max_tasks_per_child: int = Field(0, ge=0, description="worker_max_tasks_per_child (0 = never recycle)")
    api_host: str = Field("127.0.0.1", description="Address the producer API binds (containers need 0.0.0.0)")
    api_port: int = Field(0, ge=0, le=65535, description="Producer API port (0 = a free port)")
    standalone_api_port: int = Field(8000, ge=1, le=65535, description="Port of `loadlab api` when --api-port is 0")
    exporter_port: int = Field(9808, ge=1, le=65535, description="/metrics port of `loadlab exporter` when --metrics-port is 0")
    exporter_interval_s: float = Field(1.0, ge=0.1, le=3600, description="Seconds between the exporter's broker polls")
    web_port: int = Field(8089, ge=1, le=65535, description="Port of the Locust web UI of `loadlab ui` (bound to 127.0.0.1 only)")
    api_max_body_bytes: int = Field(1_048_576, ge=1, description="Largest request body the API accepts")
    startup_timeout_s: float = Field(60.0, gt=0, description="Deadline for every process to become ready")
    # --- reference tasks -----------------------------------------------------------------------------------------
    retry_max_retries: int = Field(3, ge=0, le=100, description="max_retries of the flaky task")
    retry_backoff_s: int = Field(1, ge=0, le=3600, description="retry_backoff factor (seconds, Celery rounds to an integer >= 1)")
    retry_backoff_max_s: int = Field(4, ge=0, le=86400, description="retry_backoff_max (seconds)")
    retry_jitter: bool = Field(True, description="retry_jitter (full jitter)")
    # --- load run ------------------------------------------------------------------------------------------------
    scenario: str = Field("smoke", description="Scenario to run (see `loadlab scenarios`)")
    duration: float | None = Field(None, description="Load duration (30s, 2m); unset = the scenario's own")
    users: int | None = Field(None, ge=1, le=100_000, description="Peak Locust users; unset = the scenario's own")
    spawn_rate: float | None = Field(None, gt=0, description="Users started per second; unset = the scenario's own")
    locust_workers: int = Field(0, ge=0, le=64, description="Locust worker processes (0 = Locust runs in loadlab's own process)")
    warmup_s: float = Field(0.0, ge=0, description="Seconds at the start of the load left out of the steady window")
    progress_interval_s: float = Field(5.0, gt=0, le=3600, description="Seconds between the progress lines a run prints when its output is not a terminal (CI logs)")
    queue_sample_interval_s: float = Field(1.0, gt=0, le=60, description="Seconds between the run's polls of the queue depth (one sample per bucket of the report's time series at 1)")
    drain_timeout_s: float = Field(30.0, ge=0, description="How long to wait for queued tasks after the load stops")
    interrupted_drain_s: float = Field(5.0, ge=0, le=3600, description="After Ctrl-C or SIGTERM during the load: how long the drain may take before the report is written (a second Ctrl-C skips it)")
    prometheus: bool = Field(False, description="Run Debian's Prometheus beside the run (every endpoint scraped each "
                             "second, alert rules evaluated); its TSDB stays in RUN_DIR/prometheus/ for "
                             "`loadlab dashboards render`")
    # --- internal wiring (set by the supervisor, not by users) ---------------------------------------------------
    run_id: str = Field("adhoc", description="Run identifier (ledger key prefix)")
    ledger_url: str | None = Field(None, description="Redis URL of the run's task ledger channel")
    api_url: str | None = Field(None, description="Base URL of the running producer API")
    run_dir: str | None = Field(None, description="Run directory")
    explicit: list[str] = Field(default_factory=list, description="The settings given as flags or LOADLAB_* "
                                "variables (the ones loadlab applies over an --app's own configuration)")

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, value):
        return _check_url(value, BROKER_SCHEMES, "--broker")

    @field_validator("backend")
    @classmethod
    def _backend_url(cls, value):
        return _check_url(value, BACKEND_SCHEMES, "--backend")

    @field_validator("duration", mode="before")
    @classmethod
    def _duration(cls, value):
        if value is None or value == "":
            return None
        try:
            return parse_duration(value, "--duration")
        except SettingsError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("chaos")
    @classmethod
    def _chaos_plan(cls, value):
        if value:
            parse_plan(value)  # raises ValueError with the sentence
        return value or None

    @field_validator("api_host", "metrics_host")
    @classmethod
    def _bind_address(cls, value, info):
        if not _is_host(value):
            raise ValueError(f"--{info.field_name.replace('_', '-')} {value!r} is not an address to bind; use an IP "
                             "address such as 127.0.0.1 or 0.0.0.0, or a host name such as localhost.")
        return value

    @field_validator("app")
    @classmethod
    def _app_ref(cls, value):
        if value and not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", value):
            raise ValueError(f"--app {value!r} is not module:attr; use e.g. myproject.celery:app.")
        return value or None

    @field_validator("queues")
    @classmethod
    def _queue_list(cls, value):
        if value is None or value == "":
            return None
        names = [q.strip() for q in value.split(",") if q.strip()]
        for name in names or [value]:
            if not _QUEUE_RE.match(name):
                raise ValueError(f"--queues {value!r} is not accepted; use queue names of 1 to 200 letters, digits, "
                                 "'_', '.', ':' or '-', separated by commas (e.g. celery,emails).")
        return ",".join(dict.fromkeys(names))

    @field_validator("tasks", "locustfile")
    @classmethod
    def _existing_file(cls, value, info):
        if value and not os.path.isfile(value):
            raise ValueError(f"--{info.field_name} {value!r} is not a file; use {_FILE_WANTED[info.field_name]}.")
        return value or None

    @model_validator(mode="after")
    def _chaos_redelivers_within_the_drain(self):
        # Celery's 1 h default would turn every task a killed worker held into a loss before the drain ends
        if self.chaos and "visibility_timeout_s" not in self.model_fields_set:
            object.__setattr__(self, "visibility_timeout_s", CHAOS_VISIBILITY_TIMEOUT_S)
            self.model_fields_set.add("visibility_timeout_s")
        return self

    @model_validator(mode="after")
    def _pickle_needs_consent(self):
        if self.serializer == "pickle" and not self.allow_pickle:
            raise ValueError("--serializer pickle runs arbitrary code on deserialisation; add --allow-pickle to accept that risk, or use json, msgpack or yaml.")
        return self

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, **overrides) -> "Settings":
        """Defaults <- LOADLAB_* environment <- ``overrides`` (None means: not given). Raises SettingsError."""
        given = {k: v for k, v in overrides.items() if v is not None}
        check_variable_names(os.environ)
        try:
            settings = cls(**given)
        except ValidationError as exc:
            raise SettingsError(explain(exc, flags=given)) from None
        return settings.model_copy(update={"explicit": sorted(settings.model_fields_set - {"explicit"})})

    @classmethod
    def from_env(cls) -> "Settings":
        """Rebuild the parent's settings in a child process; fall back to LOADLAB_* variables."""
        raw = os.environ.get(SETTINGS_ENV)
        if raw:
            return cls.model_validate(json.loads(raw))
        return cls.build()

    def check_ports_free(self) -> None:
        """Ports given explicitly (--api-port, --flower-port) are tried before anything starts, so a port in use is a
        usage error up front instead of a process that dies half-way through the stack's start. Raises
        SettingsError."""
        import errno
        import socket

        wanted = [("--api-port", self.api_host, self.api_port)]
        if self.flower:
            wanted.append(("--flower-port", "127.0.0.1", self.flower_port))
        for option, host, port in wanted:
            if not port:
                continue
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                # as the servers do: a port left in TIME_WAIT is free to them, only a listener makes it taken
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((host, port))
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        raise
                    raise SettingsError(f"{option} {port} is already in use on {host}; stop what listens there, "
                                        "pick another port, or give 0 for a free one.") from None

    def child_env(self, **updates) -> dict[str, str]:
        """Environment for a child process carrying these settings."""
        env = dict(os.environ)
        env[SETTINGS_ENV] = self.model_copy(update=updates).model_dump_json() if updates else self.model_dump_json()
        return env

    def masked(self) -> dict:
        """Every setting, with passwords in URLs masked: what settings.json and logs show."""
        data = self.model_dump(mode="json")
        for key in ("broker", "backend", "ledger_url"):
            data[key] = mask_url(data[key])
        return data

    @property
    def api_client_host(self) -> str:
        """Where a client on this machine reaches the API bound to ``api_host`` (a wildcard answers on loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.api_host, self.api_host)
        return f"[{host}]" if ":" in host else host

    @property
    def worker_queues(self) -> list[str]:
        """The queues the workers consume: --queues, else --queue."""
        return self.queues.split(",") if self.queues else [self.queue]

    @property
    def accept_content(self) -> list[str]:
        # json stays accepted for Celery's own control and event messages; pickle only with explicit consent.
        return sorted({self.serializer, "json"})


_FILE_WANTED = {"tasks": "a task-mix YAML file (`loadlab tasks --app module:attr` writes a first one)",
                "locustfile": "the path of your locustfile (its User classes subclass loadlab.loadtests.api.CeleryUser)"}
_PATTERN_HINTS = {"queue": "a queue name of 1 to 200 letters, digits, '_', '.', ':' or '-'"}
_NOT_A_WHOLE_NUMBER = {"int_parsing", "int_type", "int_from_float", "int_parsing_size"}
_NOT_A_NUMBER = {"float_parsing", "float_type"}
_OUT_OF_RANGE = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _number(value) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _accepted(field: str) -> str:
    """What a numeric setting accepts, from its bounds: 'a whole number from 1 to 64 (default 1)'."""
    info = Settings.model_fields.get(field)
    if info is None:
        return "a valid value"
    kinds = [t for t in (typing.get_args(info.annotation) or (info.annotation,)) if t is not type(None)]
    noun = "a whole number" if kinds and kinds[0] is int else "a number"
    low = high = None
    low_text = high_text = ""
    for bound in info.metadata:
        if getattr(bound, "ge", None) is not None:
            low, low_text = bound.ge, f"of {_number(bound.ge)} or more"
        if getattr(bound, "gt", None) is not None:
            low, low_text = bound.gt, f"greater than {_number(bound.gt)}"
        if getattr(bound, "le", None) is not None:
            high, high_text = bound.le, f"at most {_number(bound.le)}"
        if getattr(bound, "lt", None) is not None:
            high, high_text = bound.lt, f"below {_number(bound.lt)}"
    if low is not None and high is not None:
        text = (f"{noun} from {_number(low)} to {_number(high)}" if low_text.startswith("of") and high_text.startswith("at")
                else f"{noun} {low_text.removeprefix('of ')} and {high_text}")
    elif low is not None or high is not None:
        text = f"{noun} {low_text or high_text}"
    else:
        text = noun
    if info.default is not None:
        text += f" (default {_number(info.default) if isinstance(info.default, (int, float)) else info.default})"
    return text


def check_variable_names(environ: typing.Mapping[str, str]) -> None:
    """A misspelled LOADLAB_* variable would silently leave its setting at the default: refuse it, naming the
    closest setting."""
    import difflib

    known = {f"LOADLAB_{name.upper()}" for name in Settings.model_fields} | OTHER_VARIABLES
    for name in sorted(environ):
        if name.startswith("LOADLAB_") and name not in known:
            suffixes = [field.upper() for field in Settings.model_fields]
            close = difflib.get_close_matches(name[len("LOADLAB_"):], suffixes, n=1, cutoff=0.75)
            hint = f" (did you mean LOADLAB_{close[0]}?)" if close else ""
            raise SettingsError(f"environment variable {name} is not a loadlab setting{hint}; correct or unset it: "
                                "the variables are LOADLAB_ plus an option's name, e.g. LOADLAB_WORKERS for --workers.")


def explain(exc: ValidationError, flags: typing.Iterable[str] | None = None) -> str:
    """One plain sentence per bad value, naming the option (and the LOADLAB_* variable when the value came from the
    environment), the bad value and what is accepted. ``flags``: the fields given as flags (None: unknown)."""
    flags = None if flags is None else set(flags)
    sentences = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "settings"
        option = "--" + field.replace("_", "-")
        subject = f"{option} {err.get('input')!r}"
        kind = err["type"]
        msg = err["msg"].removeprefix("Value error, ")
        if kind == "literal_error":
            msg = f"{subject} is not accepted; use one of {err.get('ctx', {}).get('expected', '')}."
        elif kind == "extra_forbidden":
            msg = f"{field!r} is not a loadlab setting."
        elif kind in _NOT_A_WHOLE_NUMBER:
            msg = f"{subject} is not a whole number; use {_accepted(field)}."
        elif kind in _NOT_A_NUMBER:
            msg = f"{subject} is not a number; use {_accepted(field)}."
        elif kind == "finite_number":
            msg = f"{subject} is not a finite number; use {_accepted(field)}."
        elif kind in _OUT_OF_RANGE:
            msg = f"{subject} is out of range; use {_accepted(field)}."
        elif kind in ("bool_parsing", "bool_type"):
            msg = f"{subject} is not true or false; use true/false, yes/no, on/off or 1/0."
        elif kind == "string_pattern_mismatch":
            hint = _PATTERN_HINTS.get(field) or f"a value matching {err.get('ctx', {}).get('pattern')}"
            msg = f"{subject} is not accepted; use {hint}."
        elif not msg.startswith("--"):
            msg = f"{subject} is invalid: {msg.rstrip('.')}."
        variable = f"LOADLAB_{field.upper()}"
        if flags is not None and err["loc"] and field not in flags and variable in os.environ:
            msg = f"{msg.rstrip('.')} (set by {variable})."
        sentences.append(msg)
    return " ".join(sentences)
