"""``loadlab``: the one command line that drives the stack, the load, the reports and the gates.

Stack options are generated from ``Settings`` fields, so a flag, its ``LOADLAB_*`` variable and its default are
defined once. User errors print one sentence and exit 2; a failed gate or check exits 1.
"""
# Locust runs in-process and relies on gevent: patch before celery, kombu and redis capture socket and threading.
from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import signal  # noqa: E402
import typing  # noqa: E402
import sys  # noqa: E402
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
                   "locust_workers", "warmup_s", "drain_timeout_s", "prometheus"}
RUN_FIELDS = ("duration", "users", "spawn_rate", "locust_workers", "warmup_s", "drain_timeout_s")
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
        settings = Settings.build(**given)
        settings.check_ports_free()
        return settings
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
    """Ctrl-C, SIGTERM and SIGHUP unwind the main greenlet, so every child is stopped. Python would raise Ctrl-C's
    KeyboardInterrupt in whichever greenlet runs at that instant (the recorder's, say), which then dies alone."""
    main_greenlet = gevent.getcurrent()

    def stop(signum):
        main_greenlet.throw(KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum))

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
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
    from stack.supervisor import start_stack

    settings = _build_settings(**options)
    run_dir = _run_dir(out, "up")
    _install_stop_signals()
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
@click.option("--prometheus/--no-prometheus", "with_prometheus", default=None,
              help="Run Debian's Prometheus beside the run (every endpoint scraped each second, alert rules "
                   "evaluated), its TSDB kept in RUN_DIR/prometheus/ for `loadlab dashboards render` "
                   "(env LOADLAB_PROMETHEUS)")
def run(scenario, out, gates_file, baseline, with_prometheus, **options):
    """Start the stack, run a headless Locust scenario, drain, write the run directory, stop the stack."""
    from loadtests.scenarios import get_scenario
    from loadtests.headless import execute_run

    settings = _build_settings(scenario=scenario, prometheus=with_prometheus, **options)
    get_scenario(settings.scenario)
    rules = None
    if gates_file:
        rules = _load_gate_rules(gates_file, baseline)
    elif baseline:
        raise UsageError(f"--baseline {baseline!r} is only used with --gates; add --gates FILE or leave --baseline out.")
    run_dir = _run_dir(out, settings.scenario)
    _install_stop_signals()
    code = execute_run(settings, run_dir, console=console)
    if code != EXIT_OK:
        sys.exit(code)
    if rules is not None:
        sys.exit(_gate(run_dir, gates_file, baseline))


# --- ui -----------------------------------------------------------------------------------------------------------
@main.command()
@click.argument("scenario", required=False, default=None)
@stack_options
@run_options
@click.option("--web-port", default=8089, show_default=True, type=click.IntRange(1, 65535),
              help="Port of the Locust web UI (bound to 127.0.0.1 only)")
@click.option("--out", default=None, help="Directory for logs, Locust CSVs and each swarm's report in swarm-NNN/ "
                                          "(default reports/runs/<UTC-timestamp>-ui/)")
def ui(scenario, web_port, out, **options):
    """Start the stack and the Locust web UI (127.0.0.1) with a Celery tab; pick scenarios in the UI; each swarm's
    report is written when it stops; Ctrl-C stops every process. SCENARIO (default smoke) sets the users and spawn
    rate the form starts with."""
    from loadtests.scenarios import get_scenario
    from loadtests.webui import port_free, serve

    settings = _build_settings(scenario=scenario, **options)
    get_scenario(settings.scenario)
    if not port_free(web_port):
        raise UsageError(f"--web-port {web_port} is in use on 127.0.0.1; give a free port.")
    run_dir = _run_dir(out, "ui")
    _install_stop_signals()
    code = serve(settings, run_dir, web_port, console=console)
    if code != EXIT_OK:
        sys.exit(code)


def _load_gate_rules(gates_file: str, baseline: str | None):
    from reports.gates import GateConfigError, load_rules

    try:
        rules = load_rules(gates_file)
    except GateConfigError as exc:
        raise UsageError(_in_rules_file(exc, gates_file)) from None
    if baseline and not (Path(baseline) / "report.json").is_file():
        raise UsageError(f"--baseline {baseline!r} has no report.json; give the directory of a finished run.")
    return rules


def _in_rules_file(exc: Exception, rules_file: str) -> str:
    """Errors about one rule say 'gate rule 2 …': name the file they are in too."""
    message = str(exc)
    return f"{rules_file}: {message}" if message.startswith("gate rule") else message


def _gate(run_dir: Path, rules_file: str, baseline: str | None) -> int:
    from reports.gates import GateConfigError, gate_run_dir
    from reports.render import write_rendered
    from reports.report import load_report

    try:
        code = gate_run_dir(run_dir, rules_file, baseline, console=console)
    except GateConfigError as exc:
        raise UsageError(_in_rules_file(exc, rules_file)) from None
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


def _int_list(option: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{option} {text!r} is not a list of positive integers; use e.g. 1,2,4.")
    return values


SWEPT = {"workers", "concurrency", "prefetch_multiplier", "pool"}


@main.command()
@click.argument("scenario", required=False, default="saturate")
@_settings_options([n for n in STACK_FIELDS if n not in SWEPT])
@run_options
@click.option("--workers", "workers_list", default="1,2,3,4", show_default=True, help="Worker counts to sweep")
@click.option("--concurrency", "concurrency_list", default="1", show_default=True, help="Pool sizes to sweep")
@click.option("--prefetch", "prefetch_list", default="4", show_default=True, help="Prefetch multipliers to sweep")
@click.option("--pool", "pool_list", default="prefork", show_default=True, help="Pools to sweep (prefork,threads,solo)")
@click.option("--out", default=None, help="Directory of the sweep (default reports/runs/<UTC-timestamp>-sweep/)")
def sweep(scenario, workers_list, concurrency_list, prefetch_list, pool_list, out, **options):
    """Scaling sweep: one real run per point, warm-up excluded, USL fit, one report."""
    from loadtests.campaigns import run_sweep
    from loadtests.scenarios import get_scenario
    from reports.render import write_rendered
    from reports.report import merge_reports, write_json

    workers = _int_list("--workers", workers_list)
    concurrency = _int_list("--concurrency", concurrency_list)
    prefetch = _int_list("--prefetch", prefetch_list)
    pools = [p.strip() for p in pool_list.split(",") if p.strip()]
    for pool in pools:
        _build_settings(pool=pool)
    scenario_def = get_scenario(scenario)
    settings = _build_settings(scenario=scenario, **options)
    if options.get("warmup_s") is None:  # default: the first quarter of each point's load is warm-up
        settings = settings.model_copy(update={"warmup_s": 0.25 * (settings.duration or scenario_def.duration_s)})
    run_dir = _run_dir(out, "sweep")
    _install_stop_signals()
    scaling = run_sweep(settings, run_dir, console, workers=workers, concurrency=concurrency, prefetch=prefetch,
                        pools=pools)
    reports = [json.loads((run_dir / p["run_dir"] / "report.json").read_text()) for p in scaling["points"]]
    report = merge_reports(reports, scenario=f"sweep:{scenario}", settings_masked=settings.masked())
    report["scaling"] = scaling
    write_json(run_dir / "report.json", report)
    write_rendered(run_dir, report)
    if scaling.get("usl"):
        u = scaling["usl"]
        console.print(f"USL: λ={u['lambda']:.2f}/s σ={u['sigma']:.4f} κ={u['kappa']:.5f} "
                      f"peak N={u['n_peak']} R²={u['r2']:.3f}")
    else:
        console.print(f"[yellow]no USL fit:[/] {scaling.get('usl_note')}")
    console.print(f"report: {run_dir / 'report.html'}")


@main.command()
@_settings_options([n for n in STACK_FIELDS if n != "serializer"])
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
    from loadtests.campaigns import run_serialization_inband
    from reports import serialization as matrix
    from reports.render import write_rendered
    from reports.report import merge_reports, write_json

    serializer_list = [v.strip() for v in serializers.split(",") if v.strip()]
    allow_pickle = bool(options.get("allow_pickle"))
    for name in serializer_list:
        _build_settings(serializer=name, allow_pickle=allow_pickle)
    size_list = _int_list("--sizes", sizes)
    inband_list = _int_list("--inband-sizes", inband_sizes) if inband_sizes.strip() else []
    shape_list = [v.strip() for v in shapes.split(",") if v.strip()]
    compression_list = [v.strip() for v in compressions.split(",")] if compressions else None
    settings = _build_settings(**options)
    for shape in shape_list or [shapes]:
        if shape not in matrix.SHAPES:
            raise UsageError(f"--shapes {shape!r} is not a payload shape; use one of {', '.join(matrix.SHAPES)}.")
    for name in compression_list or ():
        if name not in matrix.available_compressions():
            raise UsageError(f"--compressions {name!r} is not available; use one of "
                             f"{', '.join(matrix.available_compressions())}.")
    run_dir = _run_dir(out, "serialization")
    _install_stop_signals()
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
    reports = [json.loads((run_dir / r["run_dir"] / "report.json").read_text()) for r in inband]
    if reports:
        report = merge_reports(reports, scenario="serialization", settings_masked=settings.masked())
    else:
        from reports.report import empty_report

        report = empty_report("serialization", settings.masked())
    report["serialization"] = rows
    report["serialization_inband"] = inband
    write_json(run_dir / "report.json", report)
    write_rendered(run_dir, report)
    console.print(f"{len(rows)} offline combinations, {len(inband)} in-band runs; report: {run_dir / 'report.html'}")


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


@main.command()
@stack_options
@click.option("--queues", default=None, help="More queues to watch besides --queue, comma-separated")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds between broker polls")
@click.option("--worker-timeout", default=None, type=click.FloatRange(min=0.1),
              help="Seconds without a heartbeat before celery_worker_up reads 0 (default 2.5x the worker's interval)")
@click.option("--task-events/--no-task-events", default=False,
              help="Count task events too (for apps not instrumented in-process; asks workers to send them)")
def exporter(queues, interval, worker_timeout, task_events, **options):
    """Serve queue depth, worker liveness and active tasks of any Celery deployment on /metrics
    (--metrics-host/--metrics-port, default port 9808)."""
    import os

    from exporters.exporter_service import DEFAULT_PORT, parse_queues

    settings = _build_settings(**options)
    if not settings.broker and not settings.app:
        raise UsageError("loadlab exporter needs --broker (or LOADLAB_BROKER), e.g. --broker redis://127.0.0.1:6379/0.")
    try:
        parse_queues(queues)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    argv = [sys.executable, "-m", "exporters.exporter_service", "--host", settings.metrics_host,
            "--port", str(settings.metrics_port or DEFAULT_PORT), "--queues", queues or "", "--interval", str(interval)]
    if worker_timeout:
        argv += ["--worker-timeout", str(worker_timeout)]
    if task_events:
        argv.append("--task-events")
    # exec a clean interpreter: the collection threads must be real threads, not this process's gevent greenlets
    os.execve(sys.executable, argv, settings.child_env())


@main.group()
def bench():
    """Side-by-side benchmarks that print ratios measured in one run."""


@bench.command("publish")
@stack_options
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(min=1), help="A B rounds")
@click.option("--seconds", default=5.0, show_default=True, type=click.FloatRange(min=0.5), help="Seconds per side")
@click.option("--out", default=None, help="Directory for the stack's logs")
def bench_publish_command(rounds, seconds, out, **options):
    """Raw send_task loop against the Locust Celery user, same stack, one process; prints rates and the ratio."""
    from loadtests.bench_publish import bench_publish

    settings = _build_settings(**options)
    run_dir = _run_dir(out, "bench-publish")
    settings = settings.model_copy(update={"run_id": run_dir.name.replace(".", "-"), "run_dir": str(run_dir)})
    _install_stop_signals()
    result = bench_publish(settings, run_dir, rounds, seconds, console)
    console.print(f"publish rate: raw send_task {result['raw_per_s']:.0f}/s, Locust Celery user "
                  f"{result['user_per_s']:.0f}/s; ratio {result['ratio']:.3f} "
                  f"(min {result['ratio_min']:.3f}, max {result['ratio_max']:.3f}; target >= 0.90)")


@bench.command("recorder")
@click.option("--sizes", default="100000,1000000", show_default=True, help="Task counts, each in a fresh process")
def bench_recorder_command(sizes):
    """Synthetic task records through the recorder and report builder: RSS ratio and 1M build time."""
    from reports.bench_recorder import measure

    counts = _int_list("--sizes", sizes)
    results = []
    for count in counts:
        with console.status(f"{count:,} task records…"):
            results.append(measure(count))
        r = results[-1]
        console.print(f"{r['tasks']:>9,} tasks: feed {r['feed_s']:.2f}s, build {r['build_s']:.2f}s, "
                      f"peak RSS {r['peak_rss_mb']:.1f} MB")
    if len(results) >= 2:
        console.print(f"RSS ratio {results[-1]['tasks']:,} : {results[0]['tasks']:,} = "
                      f"{results[-1]['peak_rss_mb'] / results[0]['peak_rss_mb']:.3f} (target <= 1.1); "
                      f"build time of the largest {results[-1]['build_s']:.2f}s (target <= 10 s)")


@bench.command("overhead")
@click.option("--rounds", default=20, show_default=True, type=click.IntRange(min=1), help="Rounds of a burst and a paced phase per stack, the order rotated each round")
@click.option("--tasks", default=1000, show_default=True, type=click.IntRange(min=100), help="No-op tasks in each burst (throughput)")
@click.option("--paced-tasks", default=40, show_default=True, type=click.IntRange(min=10), help="Tasks of each paced phase (p50)")
@click.option("--paced-rate", default=40.0, show_default=True, type=click.FloatRange(min=1), help="Tasks/s of the paced phase")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1), help="Worker processes per stack")
@click.option("--concurrency", default=2, show_default=True, type=click.IntRange(min=1), help="Prefork pool size")
@click.option("--out", default=None, help="Directory for bench.json and each stack's logs (default reports/runs/<UTC-timestamp>-bench-overhead/)")
@click.option("--with-earlier", multiple=True, metavar="PATH", help="bench.json (or its directory) of an earlier run with the same settings, summarized with this run's rounds (repeatable)")
def bench_overhead(rounds, tasks, paced_tasks, paced_rate, workers, concurrency, out, with_earlier):
    """Bare stack vs metrics vs metrics + sampled tracing vs every task traced, and a second bare stack as the A/A
    control: five stacks side by side taking turns; throughput, p50 and CPU per task, each as a ratio to bare with
    its 95% confidence interval."""
    import subprocess

    from exporters.bench_overhead import load_earlier

    try:  # before any stack starts: a wrong file is refused at once
        load_earlier(list(with_earlier), {"tasks": tasks, "paced_tasks": paced_tasks, "paced_rate": paced_rate,
                                          "workers": workers, "concurrency": concurrency})
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    run_dir = _run_dir(out, "bench-overhead")
    # a clean interpreter: this process is gevent-patched for Locust, which would distort what is measured
    code = subprocess.call([sys.executable, "-m", "exporters.bench_overhead", "bench", "--rounds", str(rounds),
                            "--tasks", str(tasks), "--paced-tasks", str(paced_tasks), "--paced-rate", str(paced_rate),
                            "--workers", str(workers), "--concurrency", str(concurrency), "--out", str(run_dir),
                            *(f"--with-earlier={path}" for path in with_earlier)])
    sys.exit(EXIT_OK if code == 0 else EXIT_FAILED)


@bench.command("exporter")
@click.option("--events", default=50_000, show_default=True, type=click.IntRange(min=1000), help="Events in the stream")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(min=1), help="Alternating rounds")
@click.option("--seed", default=7, show_default=True, type=int, help="Seed of the generated stream")
@click.option("--out", default=None, help="Directory for bench.json (default reports/runs/<UTC-timestamp>-bench-exporter/)")
def bench_exporter(events, rounds, seed, out):
    """loadlab's event handling vs Flower's EventsState on one generated stream: events/s each and the ratio."""
    import subprocess

    run_dir = _run_dir(out, "bench-exporter")
    # a clean interpreter: gevent's patched locks would slow prometheus_client inside Flower's handler
    code = subprocess.call([sys.executable, "-m", "exporters.bench_events", "--events", str(events),
                            "--rounds", str(rounds), "--seed", str(seed), "--out", str(run_dir)])
    sys.exit(EXIT_OK if code == 0 else EXIT_FAILED)


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


@dashboards.command("render")
@click.argument("run_dir")
@click.option("--out", default=None, help="Directory for the pages (default RUN_DIR/dashboards/)")
@click.option("--strict", is_flag=True, help="Exit 1 when a panel has no data or a query fails")
def dashboards_render(run_dir, out, strict):
    """Draw every dashboard panel from the Prometheus data of a `loadlab run --prometheus` run, as self-contained
    HTML pages (RUN_DIR/dashboards/<uid>.html), for review without Grafana."""
    from dashboards.prometheus_runner import PrometheusError, PrometheusMissing, StoredRunError
    from dashboards.render import render_run

    try:
        with console.status("rendering dashboards from the run's Prometheus data…") as status:
            rendered = render_run(Path(run_dir), Path(out) if out else None,
                                  progress=lambda title: status.update(f"rendering {title}…"))
    except (StoredRunError, PrometheusMissing) as exc:
        raise UsageError(str(exc)) from None
    except PrometheusError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        sys.exit(EXIT_FAILED)
    for uid, path in rendered.pages.items():
        panels = rendered.panels[uid]
        console.print(f"wrote {path}  ({sum(1 for p in panels if p.points)}/{len(panels)} panels with data)")
    for uid, title in rendered.empty:
        err_console.print(f"[yellow]no data:[/] {uid}: {title}")
    for error in rendered.errors:
        err_console.print(f"[red]query failed:[/] {error}")
    console.print(f"index: {rendered.index}")
    if strict and (rendered.empty or rendered.errors):
        sys.exit(EXIT_FAILED)


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
