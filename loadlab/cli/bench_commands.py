"""``loadlab bench …``: side-by-side benchmarks (the measuring code is in ``loadlab.bench``)."""
from __future__ import annotations

import json
import sys

import click

from loadlab.bench.settings import ExporterBench, MetricStoreBench, OverheadBench, PublishBench, RecorderBench
from loadlab.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    build_settings,
    console,
    install_stop_signals,
    int_list,
    model_options,
    patch_for_locust,
    preflight,
    run_dir_for,
    stack_options,
)


@click.group()
def bench():
    """Side-by-side benchmarks that print ratios measured in one run."""


@bench.command("publish")
@stack_options
@model_options(PublishBench)
@click.option("--out", default=None, help="Directory for bench.json and the stack's logs")
def bench_publish_command(rounds, seconds, out, **options):
    """Raw send_task loop against the Locust Celery user, same stack, one process; prints rates and the ratio."""
    patch_for_locust()
    from loadlab.bench.publish import bench_publish, render

    settings = build_settings(**options)
    preflight(settings)
    run_dir = run_dir_for(out, "bench-publish")
    settings = settings.model_copy(update={"run_id": run_dir.name.replace(".", "-"), "run_dir": str(run_dir)})
    install_stop_signals()
    result = bench_publish(settings, run_dir, rounds, seconds, console)
    (run_dir / "bench.json").write_text(json.dumps({"bench": "publish", **result}, indent=2) + "\n")
    console.print(render(result), markup=False)


@bench.command("recorder")
@model_options(RecorderBench)
def bench_recorder_command(sizes):
    """Synthetic task records through the recorder and report builder: RSS ratio and 1M build time."""
    from loadlab.bench.recorder import measure

    counts = int_list("--sizes", sizes)
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
@model_options(OverheadBench, ["rounds", "tasks", "paced_tasks", "paced_rate", "workers", "concurrency",
                               "instruction_tasks", "instruction_payload_bytes"])
@click.option("--out", default=None, help="Directory for bench.json and each stack's logs (default reports/runs/<UTC-timestamp>-bench-overhead/)")
@click.option("--with-earlier", multiple=True, metavar="PATH", help="bench.json (or its directory) of an earlier run with the same settings, summarized with this run's rounds (repeatable)")
@click.option("--instructions", is_flag=True, help="Count instructions per no-op task with valgrind callgrind in the producer, worker and pool children (bare, metrics, sampled, all traced) instead of timing")
@click.option("--public-api", is_flag=True, help="With --instructions: also every task traced through OpenTelemetry's public API only (--no-otel-fast-paths), what tracing's fast paths are worth")
def bench_overhead(rounds, tasks, paced_tasks, paced_rate, workers, concurrency, instruction_tasks,
                   instruction_payload_bytes, out, with_earlier, instructions, public_api):
    """Bare stack vs metrics vs metrics + sampled tracing vs every task traced, and a second bare stack as the A/A
    control: five stacks side by side taking turns; throughput, p50 and CPU per task, each as a ratio to bare with
    its 95% confidence interval and a verdict. With --instructions: instructions per task from callgrind instead."""
    import subprocess

    if public_api and not instructions:
        raise UsageError("--public-api compares instruction counts; give it with --instructions.")
    if instruction_payload_bytes and not instructions:
        raise UsageError("--instruction-payload-bytes sets what the counted tasks carry; give it with --instructions.")
    if instructions:
        run_dir = run_dir_for(out, "bench-overhead-instructions")
        code = subprocess.call([sys.executable, "-m", "loadlab.bench.instructions", "--tasks", str(instruction_tasks),
                                "--concurrency", str(concurrency), "--out", str(run_dir),
                                "--payload-bytes", str(instruction_payload_bytes),
                                *(["--public-api"] if public_api else [])])
        sys.exit(EXIT_OK if code == 0 else EXIT_FAILED)

    from loadlab.bench.overhead import load_earlier

    try:  # before any stack starts: a wrong file is refused at once
        load_earlier(list(with_earlier), {"tasks": tasks, "paced_tasks": paced_tasks, "paced_rate": paced_rate,
                                          "workers": workers, "concurrency": concurrency})
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    run_dir = run_dir_for(out, "bench-overhead")
    # a clean interpreter for the measuring process: nothing of the CLI loaded in it
    code = subprocess.call([sys.executable, "-m", "loadlab.bench.overhead", "bench", "--rounds", str(rounds),
                            "--tasks", str(tasks), "--paced-tasks", str(paced_tasks), "--paced-rate", str(paced_rate),
                            "--workers", str(workers), "--concurrency", str(concurrency), "--out", str(run_dir),
                            *(f"--with-earlier={path}" for path in with_earlier)])
    sys.exit(EXIT_OK if code == 0 else EXIT_FAILED)


@bench.command("exporter")
@model_options(ExporterBench)
@click.option("--out", default=None, help="Directory for bench.json (default reports/runs/<UTC-timestamp>-bench-exporter/)")
def bench_exporter(events, rounds, seed, e2e_broker, e2e_events, out):
    """loadlab's event handling (celery-exporter's series, and counting only) vs Flower's EventsState on one generated
    stream, each with its own copy of every event: events/s each and the ratios with verdicts; with --e2e-broker,
    the events/s each exporter process drains from a real broker."""
    import subprocess

    run_dir = run_dir_for(out, "bench-exporter")
    # a clean interpreter for the measuring process (never gevent-patched: patched locks would slow Flower's handler)
    code = subprocess.call([sys.executable, "-m", "loadlab.bench.events", "--events", str(events),
                            "--rounds", str(rounds), "--seed", str(seed), "--out", str(run_dir),
                            "--e2e-events", str(e2e_events), *(["--e2e-broker", e2e_broker] if e2e_broker else [])])
    sys.exit(code if code in (EXIT_OK, EXIT_USAGE) else EXIT_FAILED)  # 2: a bad --e2e-broker, already named


@bench.command("metric-store")
@model_options(MetricStoreBench)
def bench_metric_store(tasks, rounds):
    """loadlab's metric store (prometheus_client's multiprocess files, written itself) vs prometheus_client's
    public MultiProcessValue, per task recorded: the ratio, and whether the private layout is worth keeping."""
    from loadlab.bench.metric_store import render, run

    with console.status(f"{rounds} interleaved rounds of {tasks:,} tasks per side…"):
        result = run(tasks, rounds)
    console.print(render(result), highlight=False, soft_wrap=True)
    sys.exit(EXIT_OK if result["same_exposition"] else EXIT_FAILED)
