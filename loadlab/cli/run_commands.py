"""``loadlab run``, ``ui``, ``sweep``, ``serialization``, ``scenarios``: load runs and campaigns (Locust in-process)."""
from __future__ import annotations

import json
import sys

import click
from rich.table import Table

from loadlab.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    STACK_FIELDS,
    UsageError,
    build_settings,
    check_locustfile,
    check_queues_free,
    check_task_mix,
    console,
    install_stop_signals,
    int_list,
    locustfile_options,
    patch_for_locust,
    preflight,
    run_dir_for,
    run_options,
    run_queue_options,
    settings_options,
    stack_options,
)
from loadlab.cli.gate_commands import gate_run, load_gate_rules
from loadlab.reports.report import REPORT_FILE


# --- run ----------------------------------------------------------------------------------------------------------
@click.command()
@click.argument("scenario", required=False, default=None)
@stack_options
@run_options
@run_queue_options
@locustfile_options
@click.option("--out", default=None, help="Run directory (default reports/runs/<UTC-timestamp>-<scenario>/)")
@click.option("--gates", "gates_file", default=None, help="Gate rules YAML: evaluate after the run, exit 1 on failure")
@click.option("--baseline", default=None, help="Run directory to compare max_regression rules against")
@click.option("--prometheus/--no-prometheus", "with_prometheus", default=None,
              help="Run Debian's Prometheus beside the run (every endpoint scraped each second, alert rules "
                   "evaluated), its TSDB kept in RUN_DIR/prometheus/ for `loadlab dashboards render` "
                   "(env LOADLAB_PROMETHEUS)")
def run(scenario, out, gates_file, baseline, with_prometheus, **options):
    """Start the stack, run a headless Locust scenario, drain, write the run directory, stop the stack."""
    patch_for_locust()
    from loadlab.loadtests.headless import execute_run
    from loadlab.loadtests.scenarios import get_scenario

    settings = build_settings(scenario=scenario, prometheus=with_prometheus, **options)
    get_scenario(settings.scenario)
    settings = check_task_mix(check_locustfile(settings))
    rules = None
    if gates_file:
        rules = load_gate_rules(gates_file, baseline)
    elif baseline:
        raise UsageError(f"--baseline {baseline!r} is only used with --gates; add --gates FILE or leave --baseline out.")
    preflight(settings)
    check_queues_free(settings)
    run_dir = run_dir_for(out, settings.scenario)
    install_stop_signals()
    code = execute_run(settings, run_dir, console=console)  # 1: the verdict is FAIL (or the stack did not start)
    if rules is not None and code in (EXIT_OK, EXIT_FAILED) and (run_dir / REPORT_FILE).is_file():
        code = max(code, gate_run(run_dir, gates_file, baseline))
    sys.exit(code)


# --- ui -----------------------------------------------------------------------------------------------------------
@click.command()
@click.argument("scenario", required=False, default=None)
@stack_options
@run_options
@run_queue_options
@locustfile_options
@settings_options(["web_port"])
@click.option("--out", default=None, help="Directory for logs, Locust CSVs and each swarm's report in swarm-NNN/ "
                                          "(default reports/runs/<UTC-timestamp>-ui/)")
def ui(scenario, out, **options):
    """Start the stack and the Locust web UI (127.0.0.1) with a Celery tab; pick scenarios (or, with --locustfile,
    your locustfile's users) in the UI; each swarm's report is written when it stops; Ctrl-C stops every process.
    SCENARIO (default smoke) sets the users and spawn rate the form starts with."""
    patch_for_locust()
    from loadlab.loadtests.scenarios import get_scenario
    from loadlab.loadtests.webui import port_free, serve

    settings = build_settings(scenario=scenario, **options)
    get_scenario(settings.scenario)
    settings = check_task_mix(check_locustfile(settings, "ui"))
    if not port_free(settings.web_port):
        raise UsageError(f"--web-port {settings.web_port} is in use on 127.0.0.1; give a free port.")
    preflight(settings)
    check_queues_free(settings)
    run_dir = run_dir_for(out, "ui")
    install_stop_signals()
    code = serve(settings, run_dir, settings.web_port, console=console)
    if code != EXIT_OK:
        sys.exit(code)


SWEPT = {"workers", "concurrency", "prefetch_multiplier", "pool"}


@click.command()
@click.argument("scenario", required=False, default="saturate")
@settings_options([n for n in STACK_FIELDS if n not in SWEPT])
@run_options
@run_queue_options
@click.option("--workers", "workers_list", default="1,2,3,4", show_default=True, help="Worker counts to sweep")
@click.option("--concurrency", "concurrency_list", default="1", show_default=True, help="Pool sizes to sweep")
@click.option("--prefetch", "prefetch_list", default="4", show_default=True, help="Prefetch multipliers to sweep")
@click.option("--pool", "pool_list", default="prefork", show_default=True, help="Pools to sweep (prefork,threads,solo)")
@click.option("--out", default=None, help="Directory of the sweep (default reports/runs/<UTC-timestamp>-sweep/)")
def sweep(scenario, workers_list, concurrency_list, prefetch_list, pool_list, out, **options):
    """Scaling sweep: one real run per point, warm-up excluded, USL fit, one report."""
    patch_for_locust()
    from loadlab.loadtests.campaigns import run_sweep, sweep_settings
    from loadlab.loadtests.scenarios import get_scenario
    from loadlab.reports.render import write_rendered
    from loadlab.reports.report import merge_reports, write_json

    workers = int_list("--workers", workers_list)
    concurrency = int_list("--concurrency", concurrency_list)
    prefetch = int_list("--prefetch", prefetch_list)
    pools = [p.strip() for p in pool_list.split(",") if p.strip()]
    for pool in pools:
        build_settings(pool=pool)
    scenario_def = get_scenario(scenario)
    settings = check_task_mix(check_locustfile(build_settings(scenario=scenario, **options), "sweep"))
    if options.get("warmup_s") is None:  # default: the first quarter of each point's load is warm-up
        settings = settings.model_copy(update={"warmup_s": 0.25 * (settings.duration or scenario_def.duration_s)})
    preflight(settings)
    check_queues_free(settings)
    run_dir = run_dir_for(out, "sweep")
    install_stop_signals()
    scaling = run_sweep(settings, run_dir, console, workers=workers, concurrency=concurrency, prefetch=prefetch,
                        pools=pools)
    reports = [json.loads((run_dir / p["run_dir"] / REPORT_FILE).read_text()) for p in scaling["points"]]
    described = sweep_settings(settings.masked(), scaling)
    # the swept settings differ between points: the report's settings name them None, scaling.swept lists them
    report = merge_reports(reports, scenario=f"sweep:{scenario}",
                           settings_masked={k: v for k, v in described["shared"].items() if k not in scaling["swept"]})
    report["scaling"] = scaling
    write_json(run_dir / "settings.json", described)
    write_json(run_dir / REPORT_FILE, report)
    write_rendered(run_dir, report)
    for p in scaling["points"]:
        backlog = "" if p["backlog_growth_per_s"] is None else (
            f", backlog {p['backlog_growth_per_s']:+.1f}/s"
            + (" (saturated: the capacity)" if p["saturated"] else " (not saturated: the load offered)"))
        console.print(f"N={p['n']} ({p['workers']}×{p['pool']}({p['concurrency']}), prefetch "
                      f"{p['prefetch_multiplier']}): {p['completed_per_s']:.1f} completed/s in the steady window"
                      + backlog)
    if scaling.get("usl"):
        u = scaling["usl"]
        console.print(f"USL: λ={u['lambda']:.2f}/s σ={u['sigma']:.4f} κ={u['kappa']:.5f} "
                      f"peak N={u['n_peak']} R²={u['r2']:.3f}")
    else:
        console.print(f"[yellow]no USL fit:[/] {scaling.get('usl_note')}")
    console.print(f"report: {run_dir / 'report.html'}")


@click.command()
@settings_options([n for n in STACK_FIELDS if n != "serializer"])
@run_options
@click.option("--serializers", default="json,msgpack,yaml", show_default=True, help="Serializers to compare")
@click.option("--sizes", default="100,1000,10000,100000,1000000", show_default=True, help="Payload sizes (bytes)")
@click.option("--shapes", default="flat_strings,nested_dicts,numeric_lists,large_text", show_default=True,
              help="Payload shapes")
@click.option("--compressions", default=None, help="Compressions (default: every one kombu has)")
@click.option("--budget-s", default=45.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Time budget of the offline matrix")
@click.option("--inband-sizes", default="1000,100000", show_default=True,
              help="Payload sizes of the in-band runs ('' = offline only)")
@click.option("--out", default=None, help="Directory (default reports/runs/<UTC-timestamp>-serialization/)")
def serialization(serializers, sizes, shapes, compressions, budget_s, inband_sizes, out, **options):
    """Serializer × payload shape × size × compression matrix through kombu, plus in-band runs."""
    patch_for_locust()
    from loadlab.loadtests.campaigns import run_serialization_inband
    from loadlab.reports import serialization as matrix
    from loadlab.reports.render import write_rendered
    from loadlab.reports.report import merge_reports, write_json

    serializer_list = [v.strip() for v in serializers.split(",") if v.strip()]
    allow_pickle = bool(options.get("allow_pickle"))
    for name in serializer_list:
        build_settings(serializer=name, allow_pickle=allow_pickle)
    size_list = int_list("--sizes", sizes)
    inband_list = int_list("--inband-sizes", inband_sizes) if inband_sizes.strip() else []
    shape_list = [v.strip() for v in shapes.split(",") if v.strip()]
    compression_list = [v.strip() for v in compressions.split(",")] if compressions else None
    settings = check_locustfile(build_settings(**options), "serialization")
    for shape in shape_list or [shapes]:
        if shape not in matrix.SHAPES:
            raise UsageError(f"--shapes {shape!r} is not a payload shape; use one of {', '.join(matrix.SHAPES)}.")
    for name in compression_list or ():
        if name not in matrix.available_compressions():
            raise UsageError(f"--compressions {name!r} is not available; use one of "
                             f"{', '.join(matrix.available_compressions())}.")
    preflight(settings)
    run_dir = run_dir_for(out, "serialization")
    install_stop_signals()
    try:
        with console.status("offline serialization matrix…"):
            rows = matrix.run_matrix(serializer_list, shape_list, size_list, compression_list,
                                     time_budget_s=budget_s, allow_pickle=allow_pickle)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    inband = []
    if inband_list:
        inband = run_serialization_inband(settings, run_dir, console, serializers=serializer_list,
                                          sizes=inband_list, shape=shape_list[0], offline_rows=rows)
    reports = [json.loads((run_dir / r["run_dir"] / REPORT_FILE).read_text()) for r in inband]
    if reports:
        report = merge_reports(reports, scenario="serialization", settings_masked=settings.masked())
    else:
        from loadlab.reports.report import empty_report

        report = empty_report("serialization", settings.masked())
    report["serialization"] = rows
    report["serialization_inband"] = inband
    write_json(run_dir / REPORT_FILE, report)
    write_rendered(run_dir, report)
    console.print(f"{len(rows)} offline combinations, {len(inband)} in-band runs; report: {run_dir / 'report.html'}")


@click.command()
def scenarios():
    """List the scenarios, one line each."""
    from loadlab.loadtests.scenarios import SCENARIOS

    table = Table(show_header=True, header_style="bold", box=None)
    table.add_column("scenario")
    table.add_column("load", justify="right")
    table.add_column("duration", justify="right")
    table.add_column("what it does")
    for s in SCENARIOS.values():
        # an open model has no users to speak of: its load is the arrival rate, whatever the tasks take
        load = (f"{s.users * s.rate_per_user:g} tasks/s arriving" if s.open_arrivals
                else f"{s.users} users × {s.rate_per_user:g}/s")
        table.add_row(s.name, load, f"{s.duration_s:g}s", s.summary)
    console.print(table)


@click.command()
@settings_options(["app"])
@click.option("--write", "write_path", default="tasks.yml", show_default=True,
              help="Task-mix file to write with every task once ('' = list only)")
@click.option("--force", is_flag=True, help="Overwrite the --write file if it exists")
def tasks(write_path, force, **options):
    """List the tasks the app registers (your --app, else the reference tasks) with their signatures, and write a
    first task-mix file for `loadlab run --tasks`."""
    from pathlib import Path

    from loadlab.loadtests.task_mix import signature_of, starting_file
    from loadlab.stack.app import registered_tasks

    settings = build_settings(**options)
    registry = registered_tasks(settings)
    path = Path(write_path) if write_path else None
    if path is not None and path.exists() and not force:
        raise UsageError(f"--write {write_path!r} exists; give another file, add --force to overwrite it, or "
                         "--write '' to only list the tasks.")
    table = Table(show_header=True, header_style="bold", box=None)
    table.add_column("task")
    table.add_column("signature")
    table.add_column("queue")
    for name, task in registry.items():
        signature = signature_of(task)
        table.add_row(name, str(signature) if signature else "?", getattr(task, "queue", None) or "")
    console.print(table)
    if path is not None:
        try:
            path.write_text(starting_file(registry))
        except OSError as exc:
            raise UsageError(f"--write {write_path!r} cannot be written ({exc.strerror}); give a writable path.") from None
        console.print(f"wrote {path} ({len(registry)} tasks): edit it, then loadlab run --tasks {path}"
                      + (f" --app {settings.app}" if settings.app else ""))
