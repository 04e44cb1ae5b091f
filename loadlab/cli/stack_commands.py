"""``loadlab up``, ``loadlab api``, ``loadlab exporter``: the stack, or one of its services, in the foreground."""
from __future__ import annotations

import sys
import time

import click

from loadlab.cli.common import (
    EXIT_FAILED,
    STACK_FIELDS,
    UsageError,
    build_settings,
    console,
    err_console,
    install_stop_signals,
    preflight,
    run_dir_for,
    settings_options,
    stack_options,
)
from loadlab.config.settings import Settings


# --- up -----------------------------------------------------------------------------------------------------------
@click.command()
@stack_options
@click.option("--out", default=None, help="Directory for the logs of this stack")
def up(out, **options):
    """Start the stack in the foreground; Ctrl-C stops every process."""
    from loadlab.stack.supervisor import start_stack

    settings = build_settings(**options)
    preflight(settings)
    run_dir = run_dir_for(out, "up")
    install_stop_signals()
    stack = start_stack(settings, run_dir, console, err_console)
    if stack is None:
        sys.exit(EXIT_FAILED)
    try:
        s = stack.settings
        console.print(f"[green]stack up[/]  broker {Settings.masked(s)['broker']}  backend {Settings.masked(s)['backend']}")
        console.print(f"producer API {s.api_url}  (OpenAPI: {s.api_url}/docs)   logs {run_dir / 'logs'}")
        if stack.flower_url:
            console.print(f"Flower {stack.flower_url}")
        if stack.endpoints:
            console.print("metrics " + "  ".join(f"{name} {url}" for name, url in stack.endpoints.items()))
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
            time.sleep(0.5)
    except KeyboardInterrupt:
        console.print("stopping…")
    finally:
        stack.stop()


@click.command()
@stack_options
@settings_options(["standalone_api_port"])
def api(**options):
    """Run the producer API in the foreground (for containers or an existing broker)."""
    import os

    settings = build_settings(**options)
    if not settings.broker:
        raise UsageError("loadlab api needs --broker (or LOADLAB_BROKER); `loadlab up` starts an embedded one.")
    port = settings.api_port or settings.standalone_api_port
    preflight(settings)
    # exec uvicorn in this process's place: the API runs as `loadlab api` itself, with the settings as its environment
    os.execve(sys.executable, [sys.executable, "-m", "uvicorn", "loadlab.stack.api:create_app", "--factory",
                               "--host", settings.api_host, "--port", str(port), "--no-access-log",
                               "--log-level", "warning"], settings.child_env())


@click.command()
@settings_options([n for n in STACK_FIELDS if n != "queues"])  # its --queues: what to watch, not to consume
@click.option("--queues", default=None, help="More queues to watch besides --queue, comma-separated")
@settings_options(["exporter_port", "exporter_interval_s"])
@click.option("--worker-timeout", default=None, type=click.FloatRange(min=0.1),
              help="Seconds without a heartbeat before celery_worker_up reads 0 (default 2.5x the worker's interval)")
@click.option("--task-events/--no-task-events", default=False,
              help="Count task events too (for apps not instrumented in-process; asks workers to send them)")
@click.option("--task-detail/--no-task-detail", default=False,
              help="With task events, export what celery-exporter does: counters and runtime/queue-wait histograms "
                   "by task, hostname and queue (implies --task-events)")
def exporter(queues, worker_timeout, task_events, task_detail, **options):
    """Serve queue depth, worker liveness and active tasks of any Celery deployment on /metrics
    (--metrics-host, and --metrics-port or else --exporter-port)."""
    import os

    from loadlab.exporters.exporter_service import parse_queues

    settings = build_settings(**options)
    if not settings.broker and not settings.app:
        raise UsageError("loadlab exporter needs --broker (or LOADLAB_BROKER), e.g. --broker redis://127.0.0.1:6379/0.")
    try:
        parse_queues(queues)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    preflight(settings)
    argv = [sys.executable, "-m", "loadlab.exporters.exporter_service", "--host", settings.metrics_host,
            "--port", str(settings.metrics_port or settings.exporter_port), "--queues", queues or ""]
    if worker_timeout:
        argv += ["--worker-timeout", str(worker_timeout)]
    if task_events:
        argv.append("--task-events")
    if task_detail:
        argv.append("--task-detail")
    # exec the exporter service in this process's place, with the settings as its environment
    os.execve(sys.executable, argv, settings.child_env())
