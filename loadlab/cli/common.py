"""What every command group shares: the consoles, exit codes, user errors, the options generated from ``Settings``
fields (a flag, its ``LOADLAB_*`` variable and its default are defined once) and the run directory."""
from __future__ import annotations

import signal
import sys
import typing
from datetime import datetime, timezone
from pathlib import Path

import click
from rich.console import Console

from loadlab.config.settings import Settings, SettingsError

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)

INTERNAL_FIELDS = {"run_id", "ledger_url", "api_url", "run_dir", "explicit", "scenario", "duration", "users", "spawn_rate",
                   "locust_workers", "warmup_s", "drain_timeout_s", "queue_sample_interval_s", "progress_interval_s", "interrupted_drain_s", "prometheus",
                   # options of one command each, not of every stack command
                   "standalone_api_port", "exporter_port", "exporter_interval_s", "web_port", "tasks", "locustfile",
                   "allow_foreign_consumers"}
RUN_FIELDS = ("duration", "users", "spawn_rate", "locust_workers", "warmup_s", "drain_timeout_s", "queue_sample_interval_s",
              "progress_interval_s", "interrupted_drain_s")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """One sentence for the user; exit 2."""


def settings_options(fields):
    """Click options for Settings fields (string-typed: validation and its messages live in Settings)."""

    def decorate(func):
        for name in reversed(list(fields)):
            info = Settings.model_fields[name]
            flag = "--" + name.replace("_", "-")
            help_text = info.description or ""
            choices = typing.get_args(info.annotation)
            if choices and all(isinstance(c, str) for c in choices):
                help_text += f" [{'|'.join(choices)}]"
            if info.default not in (None, False, ""):
                help_text += f" (default {info.default})"
            if info.annotation is bool:
                func = click.option(f"{flag}/--no-{name.replace('_', '-')}", name, default=None,
                                    help=help_text)(func)
            else:
                func = click.option(flag, name, default=None, metavar="VALUE", help=help_text)(func)
        return func

    return decorate


STACK_FIELDS = [n for n in Settings.model_fields if n not in INTERNAL_FIELDS]
stack_options = settings_options(STACK_FIELDS)
run_options = settings_options(RUN_FIELDS)


def model_options(model, names=None):
    """Click options for the fields of a pydantic model (a benchmark's settings): default, help and range from the
    field, so they are defined once."""
    import annotated_types

    def decorate(func):
        for name in reversed(list(names or model.model_fields)):
            info = model.model_fields[name]
            low = next((m.ge for m in info.metadata if isinstance(m, annotated_types.Ge)), None)
            kind = info.annotation
            if kind is int:
                click_type = click.IntRange(min=low) if low is not None else int
            elif kind is float:
                click_type = click.FloatRange(min=low) if low is not None else float
            else:
                click_type = str
            func = click.option("--" + name.replace("_", "-"), name, default=info.default, show_default=True,
                                type=click_type, help=info.description)(func)
        return func

    return decorate


def build_settings(**given) -> Settings:
    try:
        settings = Settings.build(**given)
        settings.check_ports_free()
        return settings
    except SettingsError as exc:
        raise UsageError(str(exc)) from None


run_queue_options = settings_options(["tasks", "allow_foreign_consumers"])  # what a load run publishes, to where


def check_task_mix(settings: Settings) -> Settings:
    """The task mix (--tasks) checked against the app before anything starts (exit 2 with the sentence); the
    settings with the queues the app and the mix use."""
    from loadlab.loadtests.task_mix import load_task_mix, with_run_queues

    try:
        return with_run_queues(settings, load_task_mix(settings))
    except SettingsError as exc:
        raise UsageError(str(exc)) from None


locustfile_options = settings_options(["locustfile"])


def check_locustfile(settings: Settings, command: str = "run") -> Settings:
    """The --locustfile imported and its User classes found before anything starts (exit 2 with the sentence); the
    settings with its absolute path, so Locust worker processes find it too. Only ``loadlab run`` and ``loadlab ui``
    take one: another command given LOADLAB_LOCUSTFILE says so rather than run the scenario's users or the file's
    unchecked."""
    if not settings.locustfile:
        return settings
    if command not in ("run", "ui"):
        raise UsageError(f"LOADLAB_LOCUSTFILE={settings.locustfile!r} is taken by `loadlab run` and `loadlab ui` "
                         f"only; unset it for `loadlab {command}`.")
    if settings.tasks:
        raise UsageError(f"--tasks {settings.tasks!r} and --locustfile {settings.locustfile!r} both say what to "
                         "publish; give one of them (a locustfile publishes what its users publish).")
    from loadlab.loadtests.user_locustfile import locustfile_shape, locustfile_user_classes

    try:
        locustfile_user_classes(settings)
        locustfile_shape(settings)
    except SettingsError as exc:
        raise UsageError(str(exc)) from None
    return settings.model_copy(update={"locustfile": str(Path(settings.locustfile).resolve())})


def preflight(settings: Settings) -> None:
    """A given broker and result backend answer, or the command stops here with the sentence (exit 2)."""
    from loadlab.stack.preflight import PreflightError
    from loadlab.stack.preflight import preflight as check

    try:
        check(settings)
    except PreflightError as exc:
        raise UsageError(str(exc)) from None


def check_queues_free(settings: Settings) -> None:
    """No consumer but the run's own on its queues (unless --allow-foreign-consumers), or exit 2 naming the queue."""
    from loadlab.stack.preflight import PreflightError, foreign_consumers

    if settings.allow_foreign_consumers:
        return
    try:
        foreign_consumers(settings)
    except PreflightError as exc:
        raise UsageError(str(exc)) from None


def fail_usage(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(EXIT_USAGE)


class LoadlabGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            fail_usage(str(exc))
        except SettingsError as exc:
            fail_usage(str(exc))


def int_list(option: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{option} {text!r} is not a list of positive integers; use e.g. 1,2,4.")
    return values


def patch_for_locust() -> None:
    """Commands that run Locust in this process patch it with gevent first, before celery, kombu and redis capture
    socket and threading; the other commands stay unpatched."""
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        monkey.patch_all()


def install_stop_signals() -> None:
    """Ctrl-C, SIGTERM and SIGHUP unwind the main flow of the command, so every child is stopped. Under gevent
    (Locust in-process) they are thrown into the main greenlet: Python would raise Ctrl-C's KeyboardInterrupt in
    whichever greenlet runs at that instant (the recorder's, say), which then dies alone."""
    from gevent import monkey

    def exception_for(signum):
        return KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum)

    if monkey.is_module_patched("socket"):
        import gevent

        main_greenlet = gevent.getcurrent()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            gevent.signal_handler(signum, lambda s=signum: main_greenlet.throw(exception_for(s)))
        return

    def raise_in_main_thread(signum, _frame):
        raise exception_for(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, raise_in_main_thread)


def run_dir_for(out: str | None, scenario: str) -> Path:
    if out:
        path = Path(out)
    else:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = Path("reports") / "runs" / f"{stamp}-{scenario}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out {str(path)!r} is not a writable directory ({exc.strerror}); give a directory you can write.") from None
    return path
