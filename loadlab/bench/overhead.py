"""``loadlab bench overhead``: what loadlab's own instrumentation costs the stack it measures.

The same no-op workload on five stacks:

- ``bare``: metrics off, tracing off (the task ledger, which every loadlab run needs, is on in all of them);
- ``metrics``: the default instrumentation (metrics on, tracing off), exporter service included;
- ``metrics+sampled``: metrics and ``--tracing sampled`` at the configured ratio;
- ``all traced``: metrics and every task traced;
- ``bare again``: a second bare stack, the A/A control: its ratio to ``bare`` is what this machine's noise alone
  gives, the resolution of the run.

The stacks run side by side for the whole bench, each with its own producer process (a clean interpreter,
instrumented like its configuration, as the load generator would be), and take turns: in round r each runs a burst,
in an order drawn at random for that round (seeded: a run repeats its orders), then each runs its paced phase in
the same order. Only the stack whose turn it is has work; the others sit idle (their periodic polls and heartbeats
cost well under 1 % of a core), and a turn ends only when its stack has gone quiet. The rounds are split into
sessions of two rounds, each with a fresh set of stacks started in a rotated order (see ``sessions``).

Why a random order per round and not A B C D E rotated by r: a rotation keeps every configuration's neighbours (the
stack before ``bare`` was always ``bare again``), so whatever a turn inherits from the one before it (the previous
stack's tail of bookkeeping, caches it evicted) landed on the same configuration every round. With the rotation
and a percentile bootstrap of the median, the A/A control read 1.060 [1.010-1.220] on 8 rounds.

Why side by side and short turns: this machine's speed drifts by 10-30 % over tens of seconds (a shared VM), more
than the effects measured. With a fresh stack per run, runs of 20 s and ratios per round compared moments a minute
apart; here a round's bursts follow each other within seconds, so most of the drift cancels in each round's ratios.

The burst: tasks published as fast as one producer can (tasks / first publish -> last result stored is the
throughput figure; the CPU time of the stack's processes and the producer, per task, is the CPU figure). The paced
phase: a rate the stack keeps up with; its end-to-end p50 is the latency figure. Times come from the producer's clock
and the result's ``date_done`` (one machine). Ratios are taken per round against that round's bare stack and judged
by :mod:`loadlab.bench.verdict` (geometric mean, Student-t interval over the sessions' means: their rounds share one
set of stacks); a target is ``met`` or ``missed`` only when the interval lies on one side of it. These are this
machine's time-based figures; ``--instructions`` counts instructions instead (:mod:`loadlab.bench.instructions`).
bench.json keeps every slice.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

from loadlab.bench.settings import OverheadBench
from loadlab.bench.verdict import paired_ratio
from loadlab.stack.tasks import full_name

CONFIGS = (
    ("bare", "off", "off"),
    ("metrics", "on", "off"),
    ("metrics+sampled", "on", "sampled"),
    ("all traced", "on", "all"),
    ("bare again", "off", "off"),  # the A/A control
)
CONTROL = "bare again"
# issue #3: the default instrumentation (metrics on, tracing off) >= 0.97 x bare; every task traced >= 0.90 x
TARGETS = {"metrics": 0.97, "all traced": 0.90}
NOOP = full_name("noop")
DEFAULTS = OverheadBench()


# --- producer (a child process per configuration, for the whole bench) -----------------------------------------------
def serve(warmup: int, watch_pids: list[int]) -> None:
    """Warm up, print ``ready``, then run one slice per JSON line on stdin and print its result as a JSON line."""
    from loadlab.config.settings import Settings
    from loadlab.stack.app import make_app

    app = make_app(Settings.from_env())
    watch_pids = [*watch_pids, os.getpid()]
    _wait_stored(app, [_send(app)[0] for _ in range(warmup)])
    print("ready", flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        print(json.dumps(run_slice(app, command["paced"], command["rate"], command["burst"], watch_pids)), flush=True)


def run_slice(app, paced: int, rate: float, burst: int, watch_pids: list[int]) -> dict:
    """One turn: ``paced`` tasks at ``rate`` (end-to-end latency), then/or a burst of ``burst`` (throughput, CPU)."""
    result = {}
    if paced:
        sent_at, ids = [], []
        interval = 1.0 / rate
        next_at = time.perf_counter()
        for _ in range(paced):
            task_id, at = _send(app)
            ids.append(task_id)
            sent_at.append(at)
            next_at += interval
            time.sleep(max(0.0, next_at - time.perf_counter()))
        done = _wait_stored(app, ids)
        wait_quiet(watch_pids)
        latencies = sorted(done[i] - at for i, at in zip(ids, sent_at))
        result |= {"p50_ms": statistics.median(latencies) * 1000,
                   "p95_ms": latencies[int(len(latencies) * 0.95)] * 1000}
    if burst:
        cpu_before = tree_cpu_seconds(watch_pids)
        first = time.time()
        burst_ids = [_send(app)[0] for _ in range(burst)]
        done = _wait_stored(app, burst_ids)
        cpu_s = wait_quiet(watch_pids) - cpu_before
        result |= {"throughput_per_s": burst / (max(done.values()) - first), "cpu_ms_per_task": cpu_s * 1000 / burst}
    return result


def wait_quiet(watch_pids: list[int], window_s: float = 0.1, timeout_s: float = 10.0) -> float:
    """Wait (deadline) until the stack has finished the work of a slice: results are stored before the worker's
    MainProcess has done its bookkeeping of them, and that tail would otherwise run into the next stack's turn (and
    be missing from this slice's CPU). Quiet: two windows in a row in which the stack and producer used under 15 % of
    a core. Returns their CPU seconds at that point."""
    pids = process_tree(watch_pids)  # found once: the loop reads only their /proc entries, not all of /proc
    deadline = time.monotonic() + timeout_s
    before, quiet = cpu_seconds(pids), 0
    while quiet < 2 and time.monotonic() < deadline:
        time.sleep(window_s)
        now = cpu_seconds(pids)
        quiet = quiet + 1 if now - before < 0.15 * window_s else 0
        before = now
    return before


def tree_cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) of the given processes and all their descendants, from /proc. Less disturbed than
    wall-clock rates when other work shares the machine."""
    return cpu_seconds(process_tree(pids))


def process_tree(pids: list[int]) -> set[int]:
    """The given processes and all their descendants (one pass over /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(entry)
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo += children.get(pid, [])
    return tree


def cpu_seconds(pids) -> float:
    """CPU time (user + system) of these processes (those that have exited count 0)."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _stat_fields(pid) -> list[str] | None:
    """/proc/<pid>/stat after the command name (which may hold spaces): field 1 is the ppid, 11 and 12 utime, stime."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def close_stdin_and_wait(process: subprocess.Popen, timeout: float) -> None:
    """End a measuring child that runs until its stdin closes; kill it if it does not leave within ``timeout``."""
    try:
        process.stdin.close()
        process.wait(timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        process.kill()
        process.wait()


def _send(app, name: str | None = None, kwargs: dict | None = None) -> tuple[str, float]:
    """Publish one task (a no-op unless ``name``): its id and when it was sent."""
    task_id = str(uuid.uuid4())
    at = time.time()
    app.send_task(name or NOOP, kwargs=kwargs, task_id=task_id)
    return task_id, at


def _wait_stored(app, ids: list[str], timeout_s: float = 300.0, poll_s: float = 0.02) -> dict[str, float]:
    """Wait (deadline) until every result is stored; returns id -> date_done (epoch seconds).

    Cheap while it waits, because the stack is still draining and whatever this costs is taken from it (and counted
    in the producer's CPU): asking Redis about all the burst's keys every 50 ms cost ~2.4 ms of the producer's CPU
    per poll, more polls the slower the stack, which inflated the ratios of slower configurations. So only the last
    task published is watched (the tasks finish about in publish order), then those not stored yet are fetched."""
    backend = app.backend
    client = backend.client
    keys = {task_id: backend.get_key_for_task(task_id) for task_id in ids}
    deadline = time.monotonic() + timeout_s
    pending, stored = list(ids), {}
    while pending:
        if client.exists(keys[pending[-1]]):
            still_pending = []
            for start in range(0, len(pending), 1000):
                chunk = pending[start:start + 1000]
                for task_id, raw in zip(chunk, client.mget([keys[i] for i in chunk])):
                    if raw is None:
                        still_pending.append(task_id)
                    else:
                        stored[task_id] = raw
            pending = still_pending
            if not pending:
                break
        if time.monotonic() > deadline:
            raise TimeoutError(f"results not stored within {timeout_s:g}s")
        time.sleep(poll_s)
    done = {}
    for task_id, raw in stored.items():
        stamp = backend.decode_result(raw)["date_done"]
        stamp = stamp if isinstance(stamp, datetime) else datetime.fromisoformat(str(stamp))
        done[task_id] = stamp.timestamp()
    return done


# --- the benchmark ---------------------------------------------------------------------------------------------------
class ConfigurationStack:
    """One configuration's stack and producer, up for the whole bench; ``run_slice`` gives the producer one turn."""

    def __init__(self, base, name: str, metrics: str, tracing: str, run_dir: Path, warmup: int):
        from loadlab.stack.supervisor import Stack

        self.name, self.run_dir, self.warmup = name, run_dir, warmup
        settings = base.model_copy(update={"metrics": metrics, "tracing": tracing, "run_dir": str(run_dir),
                                           "run_id": run_dir.name.replace(".", "-")})
        self.stack = Stack(settings, run_dir, api=False, log=lambda *_: None)
        self.producer: subprocess.Popen | None = None
        self._producer_log = None

    def __enter__(self) -> "ConfigurationStack":
        self.stack.__enter__()
        try:
            # the whole stack's CPU: every child process of the supervisor (workers and their pools, Redis, exporter)
            pids = [child.pid for child in self.stack.children() if child.pid]
            self._producer_log = open(self.run_dir / "producer.log", "w")
            self.producer = subprocess.Popen(
                [sys.executable, "-m", "loadlab.bench.overhead", "serve", "--warmup", str(self.warmup),
                 "--watch-pids", ",".join(map(str, pids))],
                env=self.stack.settings.child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=self._producer_log, text=True)
            self._expect("ready")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.producer is not None:
            try:
                self.producer.stdin.close()  # end of commands: the producer leaves its loop
                self.producer.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.producer.kill()
                self.producer.wait()
            self.producer = None
        if self._producer_log is not None:
            self._producer_log.close()
        self.stack.__exit__(*exc)

    def run_slice(self, paced: int, rate: float, burst: int) -> dict:
        self.producer.stdin.write(json.dumps({"paced": paced, "rate": rate, "burst": burst}) + "\n")
        self.producer.stdin.flush()
        return json.loads(self._expect())

    def _expect(self, wanted: str | None = None) -> str:
        line = self.producer.stdout.readline().strip()
        if not line or (wanted is not None and line != wanted):
            self.producer.wait(timeout=10)
            tail = (self.run_dir / "producer.log").read_text()[-3000:]
            raise RuntimeError(f"the producer of {self.name} failed (exit {self.producer.returncode}):\n{tail}")
        return line


def start_all(base, out: Path, warmup: int, stacks, order) -> dict[str, ConfigurationStack]:
    """The stacks of ``order`` (configurations), started one after another in that order (each takes free ports as
    it starts: side by side they could pick the same one) and, at ``stacks``' exit, stopped side by side (each mostly
    waits for its processes to leave). Those that started are stopped even when a later one fails to start."""
    from concurrent.futures import ThreadPoolExecutor

    up: dict[str, ConfigurationStack] = {}

    def stop_all(*exc) -> None:
        with ThreadPoolExecutor(len(up) or 1) as pool:
            for stack in up.values():
                pool.submit(stack.__exit__, *exc)

    stacks.push(stop_all)
    for name, metrics, tracing in order:
        stack = ConfigurationStack(base, name, metrics, tracing, out / name.replace(" ", "-").replace("+", "-"),
                                   warmup)
        up[name] = stack.__enter__()
    return up


ROUNDS_PER_SESSION = 2


def sessions(rounds: int, configs: tuple, per_session: int = ROUNDS_PER_SESSION) -> list[tuple[list, range]]:
    """The bench in sessions of ``per_session`` rounds, each with its own set of stacks started in another order
    (``configs`` rotated by the session): measured, the stack started last ran 4-8 % faster than one started first
    (two bare stacks, in both start orders), so a fixed start order would favour one configuration; over
    ``len(configs)`` sessions each configuration is started in every position once.

    Short sessions, because a set of stacks keeps its speed: the median ratio of one session's stacks strayed from
    the next session's by up to ±4 % (five runs of 20 rounds in sessions of 4), more than the rounds within a
    session scatter around their own median. Many sets of stacks average that out; the interval is taken over the
    sessions' means (``loadlab.bench.verdict``) so it shows what is left of it."""
    count = max(1, -(-rounds // max(1, per_session)))
    bounds = [round(rounds * k / count) for k in range(count + 1)]
    return [(rotated(configs, k), range(bounds[k], bounds[k + 1])) for k in range(count)]


def round_order(configs: tuple, round_index: int, seed: int = 0) -> list:
    """The order of round ``round_index``'s turns: a random permutation of ``configs``, seeded by the round (see the
    module's text for why not a rotation)."""
    return random.Random(f"{seed}-{round_index}").sample(list(configs), len(configs))


def rotated(configs: tuple, index: int) -> list:
    """``configs`` starting at the index-th (A B C D, B C D A, …): over len(configs) sessions each is started in
    every position once."""
    shift = index % len(configs)
    return [*configs[shift:], *configs[:shift]]


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def bench(args, configs: tuple = CONFIGS) -> dict:
    import contextlib

    from rich.console import Console

    from loadlab.config.settings import Settings

    console = Console(highlight=False, width=150)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Settings.build(workers=args.workers, concurrency=args.concurrency)
    earlier = load_earlier(args.with_earlier, vars(args))
    results: dict[str, list[dict]] = {name: [] for name, *_ in configs}
    started = time.monotonic()
    planned = sessions(args.rounds, configs)
    for session, (start_order, round_indexes) in enumerate(planned, 1):
        with contextlib.ExitStack() as stacks:
            with console.status(f"session {session}/{len(planned)}: starting the {len(configs)} stacks…"):
                configured = start_all(base, out / f"session-{session}", args.warmup, stacks, start_order)
            console.print(f"session {session}/{len(planned)}: stacks started in the order "
                          f"{', '.join(name for name, *_ in start_order)}")
            for round_index in round_indexes:
                order = round_order(configs, round_index)
                round_results = {name: {"round": round_index + 1, "session": session} for name, *_ in configs}
                # the bursts back to back, then the paced phases: the bursts a round compares come within seconds
                for phase, paced, burst in (("burst", 0, args.tasks), ("paced", args.paced_tasks, 0)):
                    for name, *_ in order:
                        with console.status(f"round {round_index + 1}/{args.rounds}: {name}, {phase}…"):
                            round_results[name] |= configured[name].run_slice(paced, args.paced_rate, burst)
                for name, *_ in configs:
                    results[name].append(round_results[name])
                console.print(f"round {round_index + 1:>2}: " + ", ".join(
                    f"{name} {round_results[name]['throughput_per_s']:.0f}/s" for name, *_ in order))

    summary = summarize(results)
    console.print(summary_table(summary, args))
    console.print("throughput: a burst of no-op tasks, first publish -> last result stored; p50: end to end at a paced "
                  "rate; CPU: every stack process and the producer, per task of the burst. Ratios per round against "
                  "that round's bare stack: geometric mean [95% Student-t interval over the sessions]; this machine's "
                  "time-based figures. 'bare again' is a second bare stack: its interval should contain 1. A target "
                  "is 'met' or 'missed' only when the whole interval is on one side of it.", markup=False)
    console.print(f"took {time.monotonic() - started:.0f}s; slices and logs under {out}")
    record = {"rounds": args.rounds, "tasks": args.tasks, "paced_tasks": args.paced_tasks,
              "paced_rate": args.paced_rate, "workers": args.workers, "concurrency": args.concurrency,
              "slices": results, "summary": summary}
    if earlier:
        together = combined(results, earlier)
        record["earlier"] = [run["path"] for run in earlier]
        record["combined_summary"] = summarize(together)
        rounds = len(together["bare"])
        console.print(summary_table(record["combined_summary"], args,
                                    title=f"this run and {len(earlier)} earlier: {rounds} rounds in "
                                          f"{len({s.get('session') for s in together['bare']})} sessions"))
        console.print("earlier runs: " + ", ".join(record["earlier"]), markup=False)
    (out / "bench.json").write_text(json.dumps(record, indent=2))
    return record


# what a run's ratios depend on besides the code: runs combine only when all of these match
RUN_SETTINGS = ("tasks", "paced_tasks", "paced_rate", "workers", "concurrency")


def load_earlier(paths: list[str], settings: dict) -> list[dict]:
    """Earlier runs of this bench (their bench.json, or the directory holding it) to summarize with a new one.

    Their rounds count like this run's: more sessions narrow the interval, as ``--rounds`` does. The machine's
    drift between the runs is in it, because each run's sessions are resampled as sessions of their own.
    Raises ValueError (one sentence naming the file and what is wrong) for a missing or unreadable file, or a run
    whose settings differ from ``settings``."""
    runs = []
    for given in paths:
        path = Path(given)
        path = path / "bench.json" if path.is_dir() else path
        try:
            run = json.loads(path.read_text())
            slices, ran_with = run["slices"], {key: run[key] for key in RUN_SETTINGS}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"--with-earlier {given!r} is not the bench.json of a `loadlab bench overhead` run "
                             f"({type(exc).__name__}: {exc}); give such a file or its directory.") from None
        if set(slices) != {name for name, *_ in CONFIGS}:
            raise ValueError(f"--with-earlier {given!r} has the configurations {sorted(slices)}, not this bench's "
                             f"{[name for name, *_ in CONFIGS]}; give a run of this version of the bench.")
        for key, value in ran_with.items():
            if value != settings[key]:
                option = "--" + key.replace("_", "-")
                raise ValueError(f"--with-earlier {given!r} ran with {option} {value}, this run with "
                                 f"{settings[key]}; only runs with the same --tasks, --paced-tasks, --paced-rate, "
                                 f"--workers and --concurrency combine.")
        runs.append({"path": str(path), "slices": slices})
    return runs


def combined(results: dict[str, list[dict]], earlier: list[dict]) -> dict[str, list[dict]]:
    """This run's slices and the earlier runs', each earlier session labelled ``<n>.<session>`` (run n)."""
    together = {name: list(slices) for name, slices in results.items()}
    for number, run in enumerate(earlier, 1):
        for name in together:
            together[name] += [{**s, "session": f"{number}.{s.get('session')}"} for s in run["slices"][name]]
    return together


def summarize(results: dict[str, list[dict]]) -> dict:
    summary = {}
    bare = results["bare"]
    for name, slices in results.items():
        row = {"target_throughput_ratio": TARGETS.get(name)}
        for figure, key in (("throughput", "throughput_per_s"), ("p50", "p50_ms"), ("cpu", "cpu_ms_per_task")):
            ratios = [r[key] / b[key] for r, b in zip(slices, bare)]
            q1, q3 = quartiles(ratios)
            ratio = paired_ratio(ratios, [r.get("session") for r in slices])
            row |= {key: statistics.median(r[key] for r in slices), f"{figure}_ratio": ratio.value,
                    f"{figure}_ratio_ci_low": ratio.low, f"{figure}_ratio_ci_high": ratio.high,
                    f"{figure}_ratio_q1": q1, f"{figure}_ratio_q3": q3, f"{figure}_ratio_min": min(ratios),
                    f"{figure}_ratio_max": max(ratios), f"{figure}_ratio_mean": statistics.mean(ratios)}
            if name == CONTROL:  # the A/A control: each figure's interval should hold 1
                row[f"{figure}_contains_1"] = ratio.contains(1.0)
        target = row["target_throughput_ratio"]
        if target is not None:
            row["verdict"] = ratio_of(row, "throughput").verdict(target)
        summary[name] = row
    return summary


def ratio_of(row: dict, figure: str):
    from loadlab.bench.verdict import Ratio

    return Ratio(row[f"{figure}_ratio"], row[f"{figure}_ratio_ci_low"], row[f"{figure}_ratio_ci_high"], 0)


def summary_table(summary: dict, args, title: str | None = None):
    from rich.table import Table

    table = Table(title=title or f"loadlab bench overhead: {args.rounds} rounds; in each, a burst of {args.tasks} "
                                 f"no-op tasks per stack, then {args.paced_tasks} paced at {args.paced_rate:g}/s; "
                                 f"{args.workers} worker x {args.concurrency} prefork per stack",
                  box=None, header_style="bold")
    for column in ("configuration", "tasks/s", "x bare [95% CI]", "target", "p50 ms", "p50 x bare [95% CI]",
                   "CPU ms/task", "CPU x bare [95% CI]"):
        table.add_column(column, justify="left" if column == "configuration" else "right", no_wrap=True)
    for name, row in summary.items():
        target = row["target_throughput_ratio"]
        if name == CONTROL:
            shown = "A/A control: " + ("contains 1" if row["throughput_contains_1"] else "EXCLUDES 1")
        else:
            shown = "" if target is None else f">= {target:.2f} {row['verdict']}"
        table.add_row(name, f"{row['throughput_per_s']:.1f}", _ratio(row, "throughput"), shown,
                      f"{row['p50_ms']:.2f}", _ratio(row, "p50"), f"{row['cpu_ms_per_task']:.2f}", _ratio(row, "cpu"))
    return table


def _ratio(row: dict, figure: str) -> str:
    return ratio_of(row, figure).text()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loadlab bench overhead")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--warmup", type=int, default=DEFAULTS.warmup)
    p.add_argument("--watch-pids", default="")
    b = sub.add_parser("bench")  # loadlab bench overhead passes every option but the warm-up
    b.add_argument("--rounds", type=int, required=True)
    b.add_argument("--tasks", type=int, required=True)
    b.add_argument("--paced-tasks", type=int, required=True)
    b.add_argument("--paced-rate", type=float, required=True)
    b.add_argument("--warmup", type=int, default=DEFAULTS.warmup)
    b.add_argument("--workers", type=int, required=True)
    b.add_argument("--concurrency", type=int, required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--with-earlier", action="append", default=[])
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.warmup, [int(p) for p in args.watch_pids.split(",") if p])
        return 0
    bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
