"""``loadlab bench recorder``: feeds synthetic task records through the recorder and the report builder, in a fresh
process per size, and prints peak RSS (ratio 1M : 100k; target <= 1.1) and the build time of the 1M report."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def feed_and_build(tasks: int, seed: int = 1) -> dict:
    """Runs in the measured process: every task sent, most succeed, some retry first; then summary + report."""
    import random

    from loadlab.exporters import ledger
    from loadlab.reports.recorder import Recorder
    from loadlab.reports.render import render_html, render_markdown
    from loadlab.reports.report import build_report
    from loadlab.stack.tasks import full_name  # task names defined once (it loads Celery: alike at every size)

    NOOP, FLAKY = full_name("noop"), full_name("flaky")

    rng = random.Random(seed)
    recorder = Recorder("redis://127.0.0.1:1/0", "bench", max_retries=3)
    start = 1_800_000_000.0
    fed = time.perf_counter()
    for i in range(tasks):
        task_id = f"{i:032x}"
        sent = start + i / 1000.0  # 1000 tasks/s of simulated time
        recorder.handle([ledger.SENT, task_id, NOOP, sent, 0.0005 + rng.random() * 0.002, None])
        started = sent + rng.expovariate(200)
        retries = 1 if rng.random() < 0.02 else 0
        if retries:
            recorder.handle([ledger.ATTEMPT, task_id, FLAKY, "RETRY", sent, sent, None, started,
                             started + 0.001, started + 0.0015, 0, "FlakyError", None, "w1"])
            started += 1.0
        done = started + rng.expovariate(500)
        recorder.handle([ledger.ATTEMPT, task_id, NOOP, "SUCCESS", sent, sent, None, started, done,
                         done + 0.0003, retries, None, None, "w1"])
    fed = time.perf_counter() - fed
    built = time.perf_counter()
    recorder.load_stopped_at = start + tasks / 1000.0
    recorded = recorder.summary()
    report = build_report(scenario="bench", settings_masked={}, started_at=start, load_stopped_at=start + tasks / 1000,
                          recorded=recorded, locust={"requests": 0, "failures": 0, "rps": 0.0}, retry_policy={},
                          drained=True)
    render_html(report)
    render_markdown(report)
    built = time.perf_counter() - built
    assert report["tasks"]["succeeded"] == tasks
    return {"tasks": tasks, "feed_s": round(fed, 2), "build_s": round(built, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def measure(tasks: int) -> dict:
    code = f"import json; from loadlab.bench.recorder import feed_and_build; print(json.dumps(feed_and_build({tasks})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(sizes=(100_000, 1_000_000)) -> list[dict]:
    return [measure(n) for n in sizes]
