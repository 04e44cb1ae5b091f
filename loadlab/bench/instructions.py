"""``loadlab bench overhead --instructions``: instructions per no-op task, counted by ``valgrind --tool=callgrind`` in
every process of the stack that works on a task: the producer, the worker's main process and its pool children
(forked, so callgrind follows them, one count per process), for bare, metrics, sampled and all-traced stacks.

Instruction counts do not depend on what else the machine runs, so these figures settle the targets that time cannot
on a shared machine (metrics <= +3 %, every task traced <= +10 % of bare's instructions per task). Each process is
started under callgrind; after a warm-up (imports, connections, the first tasks' lazy work) the counters of every
process are zeroed (``callgrind_control -z``) and dumped (``-d``) around two phases: ``idle`` (no task for a few
seconds: heartbeats, broker polls) and ``tasks`` (N no-op tasks published and their results stored). Per task:
(instructions of the tasks phase - the idle phase's instructions per second x its duration) / N, so start-up and the
background of an idle stack are not counted per task. Python runs ~50x slower under callgrind: few tasks suffice.
"""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from loadlab.bench.verdict import paired_ratio, target_text

CONFIGS = (("bare", "off", "off"), ("metrics", "on", "off"), ("metrics+sampled", "on", "sampled"),
           ("all traced", "on", "all"))
# every task traced through OpenTelemetry's public API only (--no-otel-fast-paths): what the fast paths of
# loadlab.exporters.otel_compat are worth, against "all traced"
PUBLIC_API = "all traced, public API"
# issue #21: metrics at most +3 %, every task traced at most +10 % of bare's instructions per task
TARGETS = {"metrics": 1.03, "all traced": 1.10}
IDLE_S = 4.0
STARTUP_TIMEOUT_S = 600.0  # a worker under callgrind takes minutes to import and fork its pool on a busy machine


def callgrind_prefix(out_dir: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--quiet", f"--callgrind-out-file={out_dir}/callgrind.%p"]


def _stack_class():
    from loadlab.stack.supervisor import Stack

    class CallgrindStack(Stack):
        """A stack whose workers run under callgrind (their pool children, forked, with them)."""

        callgrind_dir: Path

        def _worker_child(self, index: int):
            child = super()._worker_child(index)
            child.command = [*callgrind_prefix(self.callgrind_dir), *child.command]
            return child

    return CallgrindStack


# --- producer (runs under callgrind) ---------------------------------------------------------------------------------
def produce(payload_bytes: int = 0) -> None:
    """Warm up, print ``ready``; then per line on stdin publish that many tasks (no-op, or the payload task with a
    ``payload_bytes`` body), wait until their results are stored, print ``done``."""
    from loadlab.bench.overhead import _send, _wait_stored
    from loadlab.config.settings import Settings
    from loadlab.stack.app import make_app
    from loadlab.stack.tasks import PayloadArgs, full_name

    app = make_app(Settings.from_env())
    # the same body every task (made once, before counting): what differs between stacks is their handling of it
    task = (full_name("payload"), PayloadArgs(size_bytes=payload_bytes, shape="nested_dicts").call_kwargs()) \
        if payload_bytes else (None, None)

    def send() -> str:
        return _send(app, *task)[0]

    _wait_stored(app, [send() for _ in range(20)], timeout_s=STARTUP_TIMEOUT_S, poll_s=0.05)
    print("ready", flush=True)
    for line in sys.stdin:
        count = int(line)
        _wait_stored(app, [send() for _ in range(count)], timeout_s=STARTUP_TIMEOUT_S, poll_s=0.05)
        print("done", flush=True)


# --- the measuring side ----------------------------------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    from loadlab.bench.overhead import process_tree as tree

    return sorted(tree([pid]))


def _control(flag: str, pids: list[int], *extra: str) -> None:
    for pid in pids:  # by pid: never every callgrind process of the user (other benches may run callgrind)
        subprocess.run(["callgrind_control", flag, *extra, str(pid)], capture_output=True, text=True, timeout=120,
                       check=False)


def _dumped(out_dir: Path, label: str, trigger: str = "dump ") -> dict[int, int]:
    """pid -> instructions of the dump named ``label`` (``trigger=""``: callgrind's own, e.g. at exit)."""
    counts = {}
    for path in glob.glob(str(out_dir / "callgrind.*")):
        with open(path, errors="replace") as handle:
            text = handle.read(4000)  # the header: pid, trigger; the summary line is near the end
            if f"Trigger: {trigger}{label}\n" not in text:
                continue
            text += handle.read()
        pid = re.search(r"^pid: (\d+)$", text, re.M)
        summary = re.search(r"^summary: (\d+)$", text, re.M)
        if pid and summary:
            counts[int(pid.group(1))] = int(summary.group(1))
    return counts


def _phase(out_dir: Path, pids: list[int], label: str, action) -> tuple[dict[int, int], float]:
    _control("-z", pids)
    started = time.monotonic()
    action()
    elapsed = time.monotonic() - started
    _control("-d", pids, label)
    deadline = time.monotonic() + 60
    counts = _dumped(out_dir, label)
    while len(counts) < len(pids) and time.monotonic() < deadline:
        time.sleep(0.5)
        counts = _dumped(out_dir, label)
    return counts, elapsed


def run_stack(base, name: str, metrics: str, tracing: str, run_dir: Path, tasks: int, console,
              fast_paths: bool = True, payload_bytes: int = 0) -> dict:
    """One stack under callgrind: warm-up, the idle phase, ``tasks`` no-op tasks. The producer's and the worker main
    process's counts come from dumps around the phases; a pool child's from its dump when it exits, its whole life
    (callgrind_control cannot reach a forked process)."""
    from loadlab.bench.overhead import close_stdin_and_wait

    out_dir = run_dir / "callgrind"
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = base.model_copy(update={"metrics": metrics, "tracing": tracing, "otel_fast_paths": fast_paths,
                                       "run_dir": str(run_dir),
                                       "run_id": run_dir.name.replace(".", "-"),
                                       "startup_timeout_s": STARTUP_TIMEOUT_S})
    stack = _stack_class()(settings, run_dir, api=False, log=lambda *_: None)
    stack.callgrind_dir = out_dir
    with stack:
        log = open(run_dir / "producer.log", "w")
        producer = subprocess.Popen([*callgrind_prefix(out_dir), sys.executable, "-m", "loadlab.bench.instructions",
                                     "produce", str(payload_bytes)], env=stack.settings.child_env(), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            if producer.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the producer of {name} failed; see {run_dir / 'producer.log'}")
            worker = stack.workers[0].popen.pid
            children = [pid for pid in process_tree(worker) if pid != worker]
            controlled = {producer.pid: "producer", worker: "worker main"}

            def run_tasks():
                producer.stdin.write(f"{tasks}\n")
                producer.stdin.flush()
                if producer.stdout.readline().strip() != "done":
                    raise RuntimeError(f"the producer of {name} failed; see {run_dir / 'producer.log'}")

            with console.status(f"{name}: idle phase under callgrind…"):
                idle, idle_s = _phase(out_dir, list(controlled), f"idle-{name}-{tasks}", lambda: time.sleep(IDLE_S))
            with console.status(f"{name}: {tasks} tasks under callgrind…"):
                busy, busy_s = _phase(out_dir, list(controlled), f"tasks-{name}-{tasks}", run_tasks)
        finally:
            close_stdin_and_wait(producer, 300)
            log.close()
    lives = _dumped(out_dir, "Program termination", trigger="")
    missing = [pid for pid in children if pid not in lives]
    if missing:
        raise RuntimeError(f"no callgrind count from the pool children {missing} of {name} (see {out_dir})")
    per_task = {}
    for pid, role in controlled.items():
        background = idle.get(pid, 0) / idle_s * busy_s  # what an idle stack does in as long
        per_task[role] = (busy.get(pid, 0) - background) / tasks
    return {"tasks": tasks, "tasks_s": busy_s, "per_task": per_task, "idle_per_s": {
        role: idle.get(pid, 0) / idle_s for pid, role in controlled.items()},
        "pool_children_life": sum(lives[pid] for pid in children), "pool_children": len(children)}


def measure_configuration(base, name: str, metrics: str, tracing: str, run_dir: Path, tasks: int, console,
                          fast_paths: bool = True, payload_bytes: int = 0) -> dict:
    """Two stacks of the configuration, with ``tasks`` and a third of them: a pool child's instructions per task are
    the difference of the children's lifetime counts over the difference of tasks (what both lives share, the
    count inherited at fork included, cancels)."""
    fewer = max(2, tasks // 3)
    small = run_stack(base, name, metrics, tracing, run_dir / f"{fewer}-tasks", fewer, console, fast_paths,
                      payload_bytes)
    large = run_stack(base, name, metrics, tracing, run_dir / f"{tasks}-tasks", tasks, console, fast_paths,
                      payload_bytes)
    by_role = dict(large["per_task"])
    by_role["pool child"] = (large["pool_children_life"] - small["pool_children_life"]) / (tasks - fewer)
    return {"tasks": tasks, "per_task": sum(by_role.values()), "by_role": by_role, "runs": [small, large]}


def bench_instructions(tasks: int, workers: int, concurrency: int, out: Path, console,
                       public_api: bool = False, payload_bytes: int = 0) -> dict:
    from loadlab.config.settings import Settings

    if not _have_valgrind():
        raise RuntimeError("valgrind is not installed: --instructions needs `valgrind --tool=callgrind`")
    base = Settings.build(workers=1, concurrency=concurrency)
    results = {}
    for name, metrics, tracing, fast_paths in [(*config, True) for config in CONFIGS] + [
            (PUBLIC_API, "on", "all", False)] * public_api:
        results[name] = measure_configuration(base, name, metrics, tracing, out / name.replace(" ", "-").replace(
            "+", "-").replace(",", ""), tasks, console, fast_paths, payload_bytes)
        console.print(f"{name}: {results[name]['per_task'] / 1e6:.3f} M instructions per task "
                      f"({', '.join(f'{r} {v / 1e6:.3f} M' for r, v in results[name]['by_role'].items())})")
    bare = results["bare"]["per_task"]
    for name, row in results.items():
        ratio = paired_ratio([row["per_task"] / bare], deterministic=True)
        row["ratio"] = ratio.value
        target = TARGETS.get(name)
        if target is not None:
            row["target"] = target
            row["verdict"] = ratio.verdict(target, higher_is_better=False)
    if PUBLIC_API in results:  # the fast paths' worth: instructions the public API adds to every traced task
        results[PUBLIC_API]["x_fast_paths"] = results[PUBLIC_API]["per_task"] / results["all traced"]["per_task"]
    record = {"bench": "overhead --instructions", "tasks": tasks, "workers": workers, "concurrency": concurrency,
              "payload_bytes": payload_bytes, "configurations": results}
    (out / "bench.json").write_text(json.dumps(record, indent=2) + "\n")
    console.print(table(record))
    if PUBLIC_API in results:
        row = results[PUBLIC_API]
        console.print(f"tracing's fast paths: every task traced costs {row['x_fast_paths']:.3f} x the instructions "
                      f"through the public API only ({row['per_task'] / 1e6:.3f} M against "
                      f"{results['all traced']['per_task'] / 1e6:.3f} M per task)", markup=False)
    console.print("instructions counted by valgrind --tool=callgrind in the producer, the worker's main process and "
                  f"its pool children, per {task_kind(payload_bytes)}, an idle stack's background (same duration) "
                  "subtracted; they "
                  "repeat for the same code and inputs whatever else the machine runs. Ratio to bare; a target is "
                  "met or missed on the count itself.", markup=False)
    return record


def table(record: dict):
    from rich.table import Table

    roles = ("producer", "worker main", "pool child")
    t = Table(title=f"loadlab bench overhead --instructions: {record['tasks']} tasks per stack, each a "
                    f"{task_kind(record.get('payload_bytes', 0))}, 1 worker x {record['concurrency']} prefork",
              box=None, header_style="bold")
    for column in ("configuration", *(f"{r} M/task" for r in roles), "total M/task", "x bare", "target"):
        t.add_column(column, justify="left" if column == "configuration" else "right", no_wrap=True)
    for name, row in record["configurations"].items():
        target = row.get("target")
        shown = "" if target is None else f"{target_text(target, False)} {row['verdict']}"
        t.add_row(name, *(f"{row['by_role'].get(r, 0) / 1e6:.3f}" for r in roles), f"{row['per_task'] / 1e6:.3f}",
                  f"{row['ratio']:.3f}", shown)
    return t


def task_kind(payload_bytes: int) -> str:
    return f"payload task of {payload_bytes:,} bytes (nested_dicts)" if payload_bytes else "no-op task"


def _have_valgrind() -> bool:
    from shutil import which

    return bool(which("valgrind") and which("callgrind_control"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["produce"]:
        produce(int(argv[1]) if len(argv) > 1 else 0)
        return 0
    import argparse

    from rich.console import Console

    parser = argparse.ArgumentParser(prog="loadlab bench overhead --instructions")
    parser.add_argument("--tasks", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--public-api", action="store_true")
    parser.add_argument("--payload-bytes", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench_instructions(args.tasks, args.workers, args.concurrency, out, Console(highlight=False, width=150),
                       public_api=args.public_api, payload_bytes=args.payload_bytes)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")  # the same hash order in every run: one source of variation less
    sys.exit(main())
