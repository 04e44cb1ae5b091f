"""A headless run: stack up -> Locust -> load stops -> drain -> run directory written -> stack down."""
from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from loadlab.config.celery_config import over_app
from loadlab.config.settings import Settings
from loadlab.exporters import loadgen_metrics, tracing
from loadlab.exporters.scrape import scrape_all
from loadlab.loadtests.progress import ProgressLines
from loadlab.loadtests.queue_sampler import QueueDepthStats, QueueSampler
from loadlab.loadtests.runner import LocustRun, completion_listener
from loadlab.loadtests.scenarios import Scenario, get_scenario
from loadlab.loadtests.user_locustfile import locustfile_shape
from loadlab.reports.recorder import Recorder
from loadlab.stack.tasks import retry_limits
from loadlab.reports.report import measured_serialization, serialization_totals, write_json
from loadlab.reports.session import RunSession
from loadlab.stack.supervisor import Stack, start_stack

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # as a shell reports a command stopped by Ctrl-C


def execute_run(settings: Settings, run_dir: Path, console: Console, scenario: Scenario | None = None) -> int:
    scenario = scenario or get_scenario(settings.scenario)
    if scenario.chaos and not settings.chaos:  # validated again: the chaos plan changes derived defaults
        settings = Settings(**{**settings.model_dump(exclude_unset=True), "chaos": scenario.chaos})
    if settings.tasks:  # the scenario gives users, rates and shape; the task mix what they publish
        console.print(f"loadlab run [bold]{scenario.name}[/] publishing the task mix {settings.tasks} of "
                      f"{settings.app or 'the reference app'}")
    elif settings.locustfile:  # the scenario gives users, rates and shape; the locustfile's users what they publish
        console.print(f"loadlab run [bold]{scenario.name}[/] with the users of {settings.locustfile} against "
                      f"{settings.app or 'the reference app'}")
        shape = locustfile_shape(settings)
        if shape is not None:
            cap = f"; --duration {settings.duration:g}s caps it" if settings.duration else ""
            console.print(f"its load shape {type(shape).__name__} decides the users and when the load ends{cap}")
    else:
        console.print(f"loadlab run [bold]{scenario.name}[/]: {scenario.summary}")
    if settings.prometheus:
        from loadlab.stack.prometheus import PrometheusMissing, binary

        try:
            binary()
        except PrometheusMissing as exc:
            console.print(f"[bold red]error:[/] --prometheus: {exc}")
            return EXIT_USAGE
    stack = start_stack(settings, run_dir, console)
    if stack is None:
        return EXIT_FAILED
    try:
        return _run_on(stack, scenario, run_dir, console)
    finally:
        with console.status("stopping the stack…"):
            stack.stop()


def _run_on(stack: Stack, scenario, run_dir: Path, console: Console) -> int:
    settings = stack.settings
    app_config = over_app(stack.app, settings) if settings.app else None
    write_json(run_dir / "settings.json", {**settings.masked(), **({"app_config": app_config} if app_config else {})})
    for sentence in (app_config or {}).get("contradicted", ()):
        console.print(f"[yellow]note:[/] {sentence}")
    load = LocustRun(settings, scenario, run_dir / "locust")
    recorder = Recorder(settings.ledger_url, settings.run_id, max_retries=retry_limits(stack.app),
                        on_completion=loadgen_metrics.observe_completions(settings, completion_listener(load.environment)),
                        warmup_s=settings.warmup_s).start()
    loadgen_metrics.serve(settings, recorder)
    # this process's serialization counts so far (earlier runs of a campaign): the run's own are the difference
    own_serialization_before = serialization_totals(_own_metrics_text()) if settings.metrics == "on" else None
    chaos = prometheus = interrupted = None
    session = RunSession(settings, recorder, stack.app, run_dir, scenario.name)
    queue_depth = QueueDepthStats()

    def on_queue_sample(at: float, depth: int | None) -> None:
        queue_depth.observe(depth, sampler.state["error"])
        if depth is not None:
            recorder.observe_queue_depth(at, depth)

    sampler = QueueSampler(stack.app, settings.queue, settings.queue_sample_interval_s, on_queue_sample).start()
    try:
        if settings.prometheus:  # after serve(): the load generator's own endpoint is a target too
            from loadlab.dashboards.queries import RULES_FILE
            from loadlab.stack.prometheus import PrometheusError, RunPrometheus

            try:
                with console.status("starting Prometheus (every endpoint scraped each second)…"):
                    prometheus = RunPrometheus(run_dir, RULES_FILE, stack).start()
            except PrometheusError as exc:
                console.print(f"[bold red]error:[/] {exc}")
                return EXIT_FAILED
        lines = ProgressLines(console, settings.progress_interval_s)
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"),
                      TimeRemainingColumn(), console=console, transient=False, disable=lines.enabled) as progress:
            if load.locustfile_shape is None:
                what = f"load ({load.users} users, {load.duration_s:g}s)"
            else:  # the shape decides the users and the end
                cap = f", at most {load.duration_s:g}s" if load.duration_s else ""
                what = f"load (shape {type(load.locustfile_shape).__name__}{cap})"
            bar = progress.add_task(what, total=1.0 if load.duration_s else None, detail="")

            def tick(fraction: float | None, stats: dict) -> None:
                if prometheus is not None:
                    prometheus.refresh_targets()  # a worker restarted by chaos serves on a new port
                c = recorder.counts
                done = c['succeeded'] + c['failed']
                progress.update(bar, completed=min(1.0, fraction or 0.0),
                                detail=f"{c['submitted']} sent, {done} done, {recorder.outstanding} in flight")
                lines.line("load", c["submitted"], done, recorder.outstanding)

            def drain_tick(left: int) -> None:
                progress.update(drain, detail=f"{left} in flight")
                c = recorder.counts
                lines.line("drain", c["submitted"], c["succeeded"] + c["failed"], left)

            chaos = _start_chaos(stack, console)
            try:
                load.run(tick)
            except RuntimeError as exc:  # Locust workers that did not start
                console.print(f"[bold red]error:[/] {exc}")
                return EXIT_FAILED
            except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C or SIGTERM: what ran so far is still reported
                interrupted = _interruption(exc, "load", load)
                console.print(f"[yellow]interrupted ({interrupted['signal']}) after "
                              f"{interrupted['at_s']:g}s of load: draining for at most "
                              f"{settings.interrupted_drain_s:g}s (Ctrl-C again skips it), then the report[/]")
            progress.update(bar, completed=1.0)
            recorder.mark_load_stopped(load.stopped_at)
            drain_s = settings.interrupted_drain_s if interrupted else settings.drain_timeout_s
            drain = progress.add_task(f"drain (≤ {drain_s:g}s)", total=None, detail="")
            try:
                session.drain(tick=drain_tick, timeout_s=drain_s)
            except (KeyboardInterrupt, SystemExit) as exc:
                session.drained = False
                interrupted = interrupted or _interruption(exc, "drain", load)
                interrupted["drain_skipped"] = True
            c = recorder.counts
            lines.line("drained", c["submitted"], c["succeeded"] + c["failed"], recorder.outstanding, force=True)
    finally:
        sampler.stop()  # takes a last sample first: the queue as the drain left it
        if chaos is not None:
            chaos.join()
        if prometheus is not None:
            prometheus.finish()  # after the drain: its end is in the data
        recorder.close()
    load.write_final_csv()  # now with the end_to_end events of every task that finished after the load stopped
    chaos_section = None
    if chaos is not None:
        chaos_section = _chaos_report(chaos.faults, recorder, settings)
        chaos_section["worker_restarts"] = chaos.restarts
    artefacts = {"settings": "settings.json", "locust CSV": "locust/", "process logs": "logs/"}
    if prometheus is not None:
        artefacts["Prometheus TSDB (loadlab dashboards render)"] = "prometheus/"
    # the final scrape, while every process still runs (before the stack stops)
    scraped = scrape_all(stack, run_dir / "metrics")
    artefacts.update({f"metrics of {name}": path for name, path in scraped.items()})
    serialization = None
    if own_serialization_before is not None:
        serialization = measured_serialization({name: run_dir / path for name, path in scraped.items()},
                                               baselines={"loadgen": own_serialization_before})
    if settings.tracing != "off" and not tracing.exports_otlp():
        artefacts["traces (OTLP JSON lines)"] = tracing.TRACES_FILE
    report = session.write(started_at=load.started_at, locust=load.stats(),
                           extra={"artefacts": artefacts,
                                  "queue_depth_sampling": queue_depth.summary(sampler, "the run's broker poll"),
                                  "serialization_measured": serialization,
                                  **({"chaos": chaos_section} if chaos_section else {}),
                                  **({"app_config": app_config} if app_config else {}),
                                  **({"interrupted": interrupted} if interrupted else {})})
    _print_summary(report, run_dir, console)
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if report["verdict"]["status"] == "fail" else EXIT_OK  # a FAIL run fails the build


def _interruption(exc: BaseException, during: str, load: LocustRun) -> dict:
    signal_name = "SIGINT" if isinstance(exc, KeyboardInterrupt) else "SIGTERM" if exc.code == 143 else "SIGHUP"
    at_s = (load.stopped_at or time.time()) - load.started_at if load.started_at else 0.0
    return {"signal": signal_name, "during": during, "at_s": round(at_s, 3), "load_duration_s": load.duration_s,
            "drain_skipped": False}


def _own_metrics_text() -> str:
    """This process's metric store in the exposition format, as its final scrape (``metrics/loadgen.prom``) has it."""
    from prometheus_client import CollectorRegistry, generate_latest

    from loadlab.exporters.metrics import STORE

    registry = CollectorRegistry(auto_describe=False)
    registry.register(STORE.collector())
    return generate_latest(registry).decode()


class _ChaosRun:
    def __init__(self, faults, greenlets):
        self.faults, self.greenlets = faults, greenlets
        self.restarts: list[dict] = []

    def join(self) -> None:
        import gevent

        gevent.killall(self.greenlets)  # faults not yet due when the load ended are not applied


def _start_chaos(stack: Stack, console: Console) -> _ChaosRun | None:
    if not stack.settings.chaos:
        return None
    import gevent

    from loadlab.stack import chaos

    faults = chaos.parse_plan(stack.settings.chaos)
    started = time.monotonic()

    run = _ChaosRun(faults, [])

    def keep_workers_up() -> None:
        # a fault can take a worker down with it (e.g. a broker restart it cannot recover from): start it again
        for worker in list(stack.workers):
            if not worker.running():
                code = worker.popen.returncode
                stack.restart(worker, kill=False)
                run.restarts.append({"worker": worker.name, "exit_code": code,
                                     "at_s": round(time.monotonic() - started, 3)})
                console.print(f"[yellow]chaos: {worker.name} exited (code {code}); started it again[/]")

    def run_plan():
        # one greenlet: the watchdog never races a fault that is restarting a worker itself
        for fault in faults:
            while time.monotonic() < started + fault.at_s:
                keep_workers_up()
                gevent.sleep(min(0.5, max(0.0, started + fault.at_s - time.monotonic())))
            try:
                chaos.apply(fault, stack, log=console.print)
            except Exception as exc:  # noqa: BLE001 - report it and go on with the run
                fault.detail = f"failed: {exc}"
                console.print(f"[red]chaos: {fault.kind} failed:[/] {exc}")
        while True:
            keep_workers_up()
            gevent.sleep(0.5)

    run.greenlets.append(gevent.spawn(run_plan))
    return run


def _chaos_report(faults, recorder: Recorder, settings: Settings) -> dict:
    from loadlab.stack import chaos

    lost = {task_id: sent_at for task_id, (_name, sent_at) in recorder.pending.items()}
    unattributed = chaos.attribute_losses(faults, lost)
    rows = []
    for fault in faults:
        promise = (chaos.expectation(fault.kind, settings) if fault.applied_at is not None
                   else {"max_lost": None, "text": f"not applied: {fault.detail or 'the run ended first'}"})
        rows.append({"fault": fault.kind, "at_s": fault.at_s, "applied": fault.applied_at is not None,
                     "detail": fault.detail, "recovered_s": fault.recovered_s, "expected_max_lost": promise["max_lost"],
                     "expectation": promise["text"], "lost": len(fault.lost_ids), "lost_ids": fault.lost_ids[:20],
                     "as_expected": promise["max_lost"] is None or len(fault.lost_ids) <= promise["max_lost"]})
    return {"faults": rows, "lost_after_every_fault": len(unattributed), "duplicates": recorder.counts["duplicates"]}


def _print_summary(report: dict, run_dir: Path, console: Console) -> None:
    t, lat = report["tasks"], report["latency_ms"]
    console.print(f"[bold]{report['verdict']['status'].upper()}[/]  submitted {t['submitted']}  succeeded {t['succeeded']}"
                  f"  failed {t['failed']}  retried {t['retried']}  lost {t['lost']}  "
                  f"completed/s {report['throughput']['completed_per_s']:.1f}")
    console.print("latency ms p50/p95/p99: " + "  ".join(
        f"{p} {lat[p]['p50']:.1f}/{lat[p]['p95']:.1f}/{lat[p]['p99']:.1f}" for p in lat))
    console.print(f"report: {run_dir / 'report.html'}")
