"""``loadlab``: the one command line that drives the stack, the load, the reports and the gates.

Stack options are generated from ``Settings`` fields, so a flag, its ``LOADLAB_*`` variable and its default are
defined once. User errors print one sentence and exit 2; a failed gate or check exits 1.
"""
# Locust runs in-process and relies on gevent: patch before celery, kombu and redis capture socket and threading.
from gevent import monkey

monkey.patch_all()

import signal  # noqa: E402
import typing  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import click  # noqa: E402
import gevent  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from stack.settings import Settings, SettingsError  # noqa: E402

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)

INTERNAL_FIELDS = {"run_id", "ledger_url", "api_url", "run_dir", "scenario", "duration", "users", "spawn_rate",
                   "drain_timeout_s"}
RUN_FIELDS = ("duration", "users", "spawn_rate", "drain_timeout_s")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """One sentence for the user; exit 2."""


def _settings_options(fields):
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
stack_options = _settings_options(STACK_FIELDS)
run_options = _settings_options(RUN_FIELDS)


def _build_settings(**given) -> Settings:
    try:
        return Settings.build(**given)
    except SettingsError as exc:
        raise UsageError(str(exc)) from None


def _fail_usage(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(EXIT_USAGE)


class LoadlabGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            _fail_usage(str(exc))
        except SettingsError as exc:
            _fail_usage(str(exc))


@click.group(cls=LoadlabGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main():
    """loadlab: load-test and observe a Celery stack (producer API, broker, workers, result backend)."""


def _install_stop_signals() -> None:
    """SIGTERM (and SIGHUP) unwind the main greenlet like Ctrl-C does, so every child is stopped."""
    main_greenlet = gevent.getcurrent()

    def stop(signum):
        main_greenlet.throw(SystemExit(128 + signum))

    for signum in (signal.SIGTERM, signal.SIGHUP):
        gevent.signal_handler(signum, stop, signum)


def _run_dir(out: str | None, scenario: str) -> Path:
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


# --- up -----------------------------------------------------------------------------------------------------------
@main.command()
@stack_options
@click.option("--out", default=None, help="Directory for the logs of this stack")
def up(out, **options):
    """Start the stack in the foreground; Ctrl-C stops every process."""
    from stack.supervisor import Stack, StartupError

    settings = _build_settings(**options)
    run_dir = _run_dir(out, "up")
    settings = settings.model_copy(update={"run_id": run_dir.name.replace(".", "-"), "run_dir": str(run_dir)})
    _install_stop_signals()
    try:
        with console.status("starting the stack…"):
            stack = Stack(settings, run_dir).__enter__()
    except StartupError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        sys.exit(EXIT_FAILED)
    try:
        s = stack.settings
        console.print(f"[green]stack up[/]  broker {Settings.masked(s)['broker']}  backend {Settings.masked(s)['backend']}")
        console.print(f"producer API {s.api_url}  (OpenAPI: {s.api_url}/docs)   logs {run_dir / 'logs'}")
        console.print(f"drive it with Locust: LOADLAB_BROKER={Settings.masked(s)['broker']} "
                      f"LOADLAB_BACKEND={Settings.masked(s)['backend']} LOADLAB_API_URL={s.api_url} "
                      f"LOADLAB_LEDGER_URL={Settings.masked(s)['ledger_url']} LOADLAB_RUN_ID={s.run_id} "
                      "locust -f loadtests/locustfile.py")
        console.print("Ctrl-C stops everything.")
        while True:
            for child in stack.children():
                if not child.running():
                    err_console.print(f"[bold red]{child.name} exited[/] (code {child.popen.returncode}); "
                                      f"last lines of {child.log_path}:\n{child.log_tail()}")
                    sys.exit(EXIT_FAILED)
            gevent.sleep(0.5)
    except KeyboardInterrupt:
        console.print("stopping…")
    finally:
        stack.stop()


# --- run ----------------------------------------------------------------------------------------------------------
@main.command()
@click.argument("scenario", required=False, default=None)
@stack_options
@run_options
@click.option("--out", default=None, help="Run directory (default reports/runs/<UTC-timestamp>-<scenario>/)")
@click.option("--gates", "gates_file", default=None, help="Gate rules YAML: evaluate after the run, exit 1 on failure")
@click.option("--baseline", default=None, help="Run directory to compare max_regression rules against")
def run(scenario, out, gates_file, baseline, **options):
    """Start the stack, run a headless Locust scenario, drain, write the run directory, stop the stack."""
    from loadtests.scenarios import get_scenario
    from loadtests.headless import execute_run

    settings = _build_settings(scenario=scenario, **options)
    get_scenario(settings.scenario)
    rules = None
    if gates_file:
        rules = _load_gate_rules(gates_file, baseline)
    run_dir = _run_dir(out, settings.scenario)
    _install_stop_signals()
    code = execute_run(settings, run_dir, console=console)
    if code != EXIT_OK:
        sys.exit(code)
    if rules is not None:
        sys.exit(_gate(run_dir, gates_file, baseline))


def _load_gate_rules(gates_file: str, baseline: str | None):
    from reports.gates import GateConfigError, load_rules

    try:
        rules = load_rules(gates_file)
    except GateConfigError as exc:
        raise UsageError(str(exc)) from None
    if baseline and not (Path(baseline) / "report.json").is_file():
        raise UsageError(f"--baseline {baseline!r} has no report.json; give the directory of a finished run.")
    return rules


def _gate(run_dir: Path, rules_file: str, baseline: str | None) -> int:
    from reports.gates import GateConfigError, gate_run_dir
    from reports.render import write_rendered
    from reports.report import load_report

    try:
        code = gate_run_dir(run_dir, rules_file, baseline, console=console)
    except GateConfigError as exc:
        raise UsageError(str(exc)) from None
    write_rendered(run_dir, load_report(run_dir))
    return code


@main.command()
@click.argument("run_dir")
@click.option("--rules", required=True, help="Gate rules YAML")
@click.option("--baseline", default=None, help="Run directory to compare max_regression rules against")
def gate(run_dir, rules, baseline):
    """Evaluate gates on a finished run: exit 0 pass, 1 a rule failed, 2 bad rules or run directory."""
    if not (Path(run_dir) / "report.json").is_file():
        raise UsageError(f"RUN_DIR {run_dir!r} has no report.json; give the directory of a finished run.")
    sys.exit(_gate(Path(run_dir), rules, baseline))


@main.command()
@click.argument("run_dir")
def report(run_dir):
    """Rebuild report.html and summary.md from a run directory's report.json."""
    from reports.render import write_rendered
    from reports.report import load_report

    path = Path(run_dir)
    if not (path / "report.json").is_file():
        raise UsageError(f"RUN_DIR {run_dir!r} has no report.json; give the directory of a finished run.")
    try:
        data = load_report(path)
    except ValueError as exc:
        raise UsageError(f"{path / 'report.json'} is not valid JSON ({exc}).") from None
    write_rendered(path, data)
    console.print(f"rebuilt {path / 'report.html'} and {path / 'summary.md'}")


@main.command()
@stack_options
def api(**options):
    """Run the producer API in the foreground (for containers or an existing broker)."""
    import os

    settings = _build_settings(**options)
    if not settings.broker:
        raise UsageError("loadlab api needs --broker (or LOADLAB_BROKER); `loadlab up` starts an embedded one.")
    port = settings.api_port or 8000
    # exec a clean interpreter: uvicorn's asyncio loop must not run in this gevent-patched process
    os.execve(sys.executable, [sys.executable, "-m", "uvicorn", "stack.api:create_app", "--factory",
                               "--host", settings.api_host, "--port", str(port), "--no-access-log",
                               "--log-level", "warning"], settings.child_env())


@main.group()
def dashboards():
    """Grafana dashboards and alert rules kept as code."""


@dashboards.command("build")
def dashboards_build():
    """Regenerate the committed dashboard JSON from the Python definitions."""
    from dashboards.build import build

    for path in build():
        console.print(f"wrote {path}")


@dashboards.command("check")
def dashboards_check():
    """Fail (exit 1) when the committed JSON is stale or a query does not parse."""
    from dashboards.build import PromtoolMissing, check

    try:
        problems = check()
    except PromtoolMissing as exc:
        raise UsageError(str(exc)) from None
    for problem in problems:
        err_console.print(f"[red]✗[/] {problem}")
    if problems:
        sys.exit(EXIT_FAILED)
    console.print("dashboards and alert rules are up to date and every query parses")


@main.command()
def scenarios():
    """List the scenarios, one line each."""
    from loadtests.scenarios import SCENARIOS

    table = Table(show_header=True, header_style="bold", box=None)
    table.add_column("scenario")
    table.add_column("users", justify="right")
    table.add_column("duration", justify="right")
    table.add_column("what it does")
    for s in SCENARIOS.values():
        table.add_row(s.name, str(s.users), f"{s.duration_s:g}s", s.summary)
    console.print(table)


if __name__ == "__main__":
    main()
