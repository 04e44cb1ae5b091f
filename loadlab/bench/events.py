"""``loadlab bench exporter``: the exporter's event handling against Flower's, on one generated stream, one process.

The stream is what a busy cluster sends: clients' ``task-sent``, workers' ``task-received``/``started`` and an outcome
(mostly ``succeeded``; some ``failed``; some ``retried`` and then received again), many task names with a skewed mix,
many workers, tasks interleaved (a window of tasks in flight) and each worker's ``worker-heartbeat`` every 2 s of
stream time. Fields are the ones Celery puts in each event, with ``timestamp``, ``local_received`` and Lamport
``clock`` as ``EventReceiver`` leaves them.

The same list of events goes, at full speed, to loadlab's :class:`~loadlab.exporters.exporter_service.EventState` (with task
events counted, its heaviest configuration) and to ``flower.events.EventsState`` (Flower's own defaults), in
alternating rounds, each on fresh state; the median rate of each and their ratio are printed, with bare
``celery.events.state.State`` as a reference. Both are checked to
have seen every event: our per-type counts must equal the stream's.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
import uuid as uuidlib
from collections import Counter
from pathlib import Path

from loadlab.bench.settings import ExporterBench

TARGET_RATIO = 5.0


def generate_stream(n_events: int, *, workers: int = 12, task_names: int = 60, in_flight: int = 400,
                    tasks_per_s: float = 2000.0, seed: int = ExporterBench().seed) -> list[dict]:
    rng = random.Random(seed)
    hosts = [f"celery@worker-{i:02d}.prod.example" for i in range(workers)]
    producers = [f"gen{i}@api-{i}" for i in range(3)]
    modules = ["billing", "emails", "reports", "images", "search", "sync", "etl", "notify"]
    names = [f"app.{modules[i % len(modules)]}.task_{i:02d}" for i in range(task_names)]
    weights = [1.0 / (rank + 1) for rank in range(task_names)]  # Zipf-like mix: a few names dominate
    t = 1_760_000_000.0
    clock = 1000
    step = 1.0 / (tasks_per_s * 4.2)  # about 4.2 events per task
    next_beat = {h: t + rng.random() * 2.0 for h in hosts}
    processed = dict.fromkeys(hosts, 0)
    active = dict.fromkeys(hosts, 0)
    events: list[dict] = []
    live: list[dict] = []

    def base(kind: str, host: str) -> dict:
        nonlocal clock
        clock += 1
        return {"type": kind, "hostname": host, "utcoffset": 0, "pid": 4000 + hash(host) % 1000, "clock": clock,
                "timestamp": t, "local_received": t + 0.0004}

    def new_task() -> dict:
        name = rng.choices(names, weights)[0]
        task_id = str(uuidlib.UUID(int=rng.getrandbits(128), version=4))
        return {"uuid": task_id, "name": name, "stage": "sent", "retries": 0, "worker": rng.choice(hosts),
                "args": repr((rng.randrange(10**6), f"user-{rng.randrange(10**4)}")),
                "kwargs": repr({"region": rng.choice(["eu", "us", "ap"]), "attempt": 1})}

    while len(events) < n_events:
        t += step
        for host, due in next_beat.items():
            if t >= due:
                ev = base("worker-heartbeat", host)
                ev.update(freq=2.0, active=active[host], processed=processed[host], loadavg=[1.2, 0.9, 0.7],
                          sw_ident="py-celery", sw_ver="5.5.3", sw_sys="Linux")
                events.append(ev)
                next_beat[host] = due + 2.0
        while len(live) < in_flight:
            live.append(new_task())
        index = rng.randrange(len(live))
        task = live[index]
        stage, host = task["stage"], task["worker"]
        if stage == "sent":
            ev = base("task-sent", rng.choice(producers))
            ev.update(uuid=task["uuid"], root_id=task["uuid"], parent_id=None, name=task["name"], args=task["args"],
                      kwargs=task["kwargs"], retries=task["retries"], eta=None, expires=None, queue="celery",
                      exchange="", routing_key="celery")
            task["stage"] = "received"
        elif stage == "received":
            ev = base("task-received", host)
            ev.update(uuid=task["uuid"], name=task["name"], args=task["args"], kwargs=task["kwargs"],
                      root_id=task["uuid"], parent_id=None, retries=task["retries"], eta=None, expires=None)
            task["stage"] = "started"
        elif stage == "started":
            ev = base("task-started", host)
            ev.update(uuid=task["uuid"])
            active[host] += 1
            task["stage"] = "outcome"
        else:
            roll = rng.random()
            active[host] = max(0, active[host] - 1)
            processed[host] += 1
            if roll < 0.07 and task["retries"] < 3:
                ev = base("task-retried", host)
                ev.update(uuid=task["uuid"], exception="ConnectionError('upstream timed out')",
                          traceback="Traceback (most recent call last):\n  ...\nConnectionError: upstream timed out\n")
                task.update(stage="received", retries=task["retries"] + 1, worker=rng.choice(hosts))
            elif roll < 0.12:
                ev = base("task-failed", host)
                ev.update(uuid=task["uuid"], exception="ValueError('bad input')",
                          traceback="Traceback (most recent call last):\n  ...\nValueError: bad input\n")
                live[index] = live[-1]
                live.pop()
            else:
                ev = base("task-succeeded", host)
                ev.update(uuid=task["uuid"], result=repr({"ok": True, "rows": rng.randrange(1000)}),
                          runtime=rng.lognormvariate(-4.0, 1.2))
                live[index] = live[-1]
                live.pop()
        events.append(ev)
    return events[:n_events]


def _timed(events: list[dict], state, handle) -> tuple[float, object]:
    started = time.perf_counter()
    for event in events:
        handle(event)
    return time.perf_counter() - started, state


def _time_loadlab(events: list[dict]) -> tuple[float, object]:
    from loadlab.exporters.exporter_service import EventState

    state = EventState(task_events=True)
    return _timed(events, state, state.handle)


def _time_flower(events: list[dict]) -> tuple[float, object]:
    from flower.events import EventsState
    from flower.options import options

    state = EventsState(max_tasks_in_memory=options.max_tasks)
    return _timed(events, state, state.event)


def _time_celery(events: list[dict]) -> tuple[float, object]:
    from celery.events.state import State

    state = State()
    return _timed(events, state, state.event)


def run(n_events: int, rounds: int, seed: int = ExporterBench().seed) -> dict:
    t0 = time.perf_counter()
    events = generate_stream(n_events, seed=seed)
    generated_s = time.perf_counter() - t0
    kinds = Counter(e["type"] for e in events)
    rates = {"loadlab": [], "flower": [], "celery": []}
    checks = {}
    for _round in range(rounds):
        for name, timer in (("loadlab", _time_loadlab), ("flower", _time_flower), ("celery", _time_celery)):
            gc.collect()
            elapsed, state = timer(events)
            rates[name].append(len(events) / elapsed)
            if name == "loadlab":
                seen = {k: sum(v.values()) for k, v in state.counts.items() if v}
                expected = {k: n for k, n in kinds.items() if k.startswith("task-")}
                checks["loadlab_counts_match_stream"] = seen == expected and state.events == len(events)
                checks["loadlab_workers"] = len(state.workers)
            elif name == "flower":
                checks["flower_events_counted"] = state.event_count == len(events)
                checks["flower_workers"] = len(state.workers)
            del state
    loadlab = statistics.median(rates["loadlab"])
    flower = statistics.median(rates["flower"])
    return {
        "events": len(events), "rounds": rounds, "seed": seed, "generated_in_s": round(generated_s, 2),
        "mix": dict(sorted(kinds.items())),
        "task_names": len({e["name"] for e in events if "name" in e}),
        "workers": len({e["hostname"] for e in events if e["type"] == "worker-heartbeat"}),
        "loadlab_events_per_s": {"median": round(loadlab), "min": round(min(rates["loadlab"])),
                                 "max": round(max(rates["loadlab"]))},
        "flower_events_per_s": {"median": round(flower), "min": round(min(rates["flower"])),
                                "max": round(max(rates["flower"]))},
        "celery_state_events_per_s": {"median": round(statistics.median(rates["celery"])),
                                      "min": round(min(rates["celery"])), "max": round(max(rates["celery"]))},
        "ratio": round(loadlab / flower, 2),
        "target_ratio": TARGET_RATIO,
        "checks": checks,
    }


def render(result: dict) -> str:
    ll, fl, cs = result["loadlab_events_per_s"], result["flower_events_per_s"], result["celery_state_events_per_s"]
    mix = ", ".join(f"{k} {v}" for k, v in result["mix"].items())
    verdict = "meets" if result["ratio"] >= result["target_ratio"] else "BELOW"
    return "\n".join([
        f"stream: {result['events']} events ({mix}); {result['task_names']} task names, {result['workers']} workers",
        f"rounds: {result['rounds']} alternating, fresh state each; median (min–max) events/s",
        f"  loadlab EventState    {ll['median']:>10,}  ({ll['min']:,}–{ll['max']:,})",
        f"  flower EventsState    {fl['median']:>10,}  ({fl['min']:,}–{fl['max']:,})",
        f"  celery State (ref.)   {cs['median']:>10,}  ({cs['min']:,}–{cs['max']:,})",
        f"ratio loadlab/flower: {result['ratio']:.1f}×  ({verdict} the {result['target_ratio']:g}× target)",
        "checks: " + ", ".join(f"{k}={v}" for k, v in result["checks"].items()),
        "(handlers only, same decoded dicts for each: message decoding, identical for all, is not timed)",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loadlab bench exporter")
    defaults = ExporterBench()
    parser.add_argument("--events", type=int, default=defaults.events)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", default=None, help="directory to write bench.json to")
    args = parser.parse_args(argv)
    result = run(args.events, args.rounds, args.seed)
    print(render(result), flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps({"bench": "exporter", **result}, indent=2) + "\n")
        print(f"wrote {out / 'bench.json'}")
    ok = all(v for k, v in result["checks"].items() if not k.endswith("_workers"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
