"""``loadlab bench exporter``: event handling of loadlab's exporter against Flower's, on one generated stream, and
the events/s each exporter process keeps up with from a real broker.

The stream is what a busy fleet sends: clients' ``task-sent``, workers' ``task-received``/``started`` and an outcome
(mostly ``succeeded``; some ``failed``; some ``retried`` and then received again), many task names with a skewed mix,
many workers, tasks interleaved (a window of tasks in flight) and each worker's ``worker-heartbeat`` every 2 s of
stream time. Fields are the ones Celery puts in each event, with ``timestamp``, ``local_received`` and Lamport
``clock`` as ``EventReceiver`` leaves them.

Handlers, each given its own copy of every event (Flower and Celery's ``State`` change the dicts they get), in an
order drawn per round, each on fresh state:

- ``loadlab detailed``: :class:`~loadlab.exporters.event_detail.DetailedEventState`, what celery-exporter exports
  (per-task state; counters, runtime and queue-wait histograms by task, hostname and queue; worker up and active):
  the equal-work comparison;
- ``loadlab counting``: :class:`~loadlab.exporters.exporter_service.EventState` with task events, the exporter's
  default (counts by task name, runtime histogram, no per-task state beyond the id -> name map);
- ``flower``: ``flower.events.EventsState`` (Flower's own defaults);
- ``celery State``: bare ``celery.events.state.State`` (what celery-exporter's ``Exporter`` builds on), a reference;
- celery-exporter's own ``Exporter`` when its package is importable (``src.exporter``-style ``exporter`` module);
  otherwise the column is skipped with the reason.

Ratios per round against Flower, judged by :mod:`loadlab.bench.verdict`. The copies are made before the clock starts
and message decoding, identical for all, is not timed here; the end-to-end figure includes it.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import subprocess
import sys
import time
import uuid as uuidlib
from collections import Counter
from pathlib import Path

from loadlab.bench.settings import ExporterBench
from loadlab.bench.verdict import paired_ratio, target_text

TARGET_RATIO = 5.0  # loadlab's exporter handles events >= 5x as fast as Flower, doing the same work


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


def _timed(events: list[dict], handle) -> float:
    started = time.perf_counter()
    for event in events:
        handle(event)
    return time.perf_counter() - started


def _loadlab_detailed():
    from loadlab.exporters.event_detail import DetailedEventState

    state = DetailedEventState()
    return state, state.handle


def _loadlab_counting():
    from loadlab.exporters.exporter_service import EventState

    state = EventState(task_events=True)
    return state, state.handle


def _flower():
    from flower.events import EventsState
    from flower.options import options

    state = EventsState(max_tasks_in_memory=options.max_tasks)
    return state, state.event


def _celery_state():
    from celery.events.state import State

    state = State()
    return state, state.event


def celery_exporter_factory():
    """celery-exporter's ``Exporter`` (its handlers on its own registry and Celery ``State``), or the reason it cannot
    be run here."""
    try:
        from exporter import Exporter  # danihodovic/celery-exporter's module, when installed
    except ImportError:
        return None, ("celery-exporter is not installed: PyPI's celery-exporter 1.5.1 is a Rust (maturin) sdist that "
                      "does not build with current maturin, and danihodovic/celery-exporter (the Exporter class) is "
                      "not published on PyPI")

    def make():
        from celery.events.state import State

        exporter = Exporter()
        exporter.state = State()
        handlers = exporter._setup_event_handlers()  # noqa: SLF001 - how its receiver dispatches
        return exporter, lambda event: handlers.get(event["type"], _ignore)(event)
    return make, None


def _ignore(_event) -> None:
    return None


HANDLERS = {"loadlab detailed": _loadlab_detailed, "loadlab counting": _loadlab_counting, "flower": _flower,
            "celery State": _celery_state}
REFERENCE = "flower"


def run(n_events: int, rounds: int, seed: int = ExporterBench().seed) -> dict:
    t0 = time.perf_counter()
    events = generate_stream(n_events, seed=seed)
    generated_s = time.perf_counter() - t0
    kinds = Counter(e["type"] for e in events)
    handlers = dict(HANDLERS)
    make_exporter, skipped = celery_exporter_factory()
    if make_exporter is not None:
        handlers["celery-exporter"] = make_exporter
    rates: dict[str, list[float]] = {name: [] for name in handlers}
    checks = {}
    for round_index in range(rounds):
        for name in random.Random(f"{seed}-{round_index}").sample(list(handlers), len(handlers)):
            copies = [dict(event) for event in events]  # its own copy of every event, made before the clock starts
            state, handle = handlers[name]()
            gc.collect()
            rates[name].append(len(events) / _timed(copies, handle))
            checks.update(_checks(name, state, events, kinds))
            del state, handle, copies
    ratios = {name: paired_ratio([r / f for r, f in zip(values, rates[REFERENCE])])
              for name, values in rates.items() if name != REFERENCE}
    result = {
        "events": len(events), "rounds": rounds, "seed": seed, "generated_in_s": round(generated_s, 2),
        "mix": dict(sorted(kinds.items())),
        "task_names": len({e["name"] for e in events if "name" in e}),
        "workers": len({e["hostname"] for e in events if e["type"] == "worker-heartbeat"}),
        "events_per_s": {name: {"median": round(sorted(v)[len(v) // 2]), "min": round(min(v)), "max": round(max(v))}
                         for name, v in rates.items()},
        "ratio_to_flower": {name: {"ratio": r.value, "ci_low": r.low, "ci_high": r.high} for name, r in ratios.items()},
        "target_ratio": TARGET_RATIO,
        "verdict": ratios["loadlab detailed"].verdict(TARGET_RATIO),
        "skipped": {"celery-exporter": skipped} if skipped else {},
        "checks": checks,
    }
    return result


def _checks(name: str, state, events: list[dict], kinds: Counter) -> dict:
    """Each handler saw the whole stream."""
    if name == "loadlab counting":
        seen = {k: sum(v.values()) for k, v in state.counts.items() if v}
        expected = {k: n for k, n in kinds.items() if k.startswith("task-")}
        return {"loadlab_counts_match_stream": seen == expected and state.events == len(events)}
    if name == "loadlab detailed":
        seen = {k: sum(v.values()) for k, v in state.detail_counts.items() if sum(v.values())}
        expected = {k: n for k, n in kinds.items() if k.startswith("task-")}
        return {"loadlab_detailed_counts_match_stream": seen == expected and state.events == len(events)}
    if name == "flower":
        return {"flower_events_counted": state.event_count == len(events)}
    return {}


# --- end to end: each exporter process draining events from a real broker ---------------------------------------------
E2E_HANDLERS = ("loadlab detailed", "loadlab counting", "flower")


def consume(broker: str, exchange: str, node_id: str, handler: str, count: int) -> None:
    """Runs in the measured process: declare the event queue, say ``ready``, wait for ``go``, drain ``count`` events
    through ``handler``'s receiver (loadlab's lean receiver, or Celery's as Flower uses it), print the seconds."""
    from celery import Celery

    app = Celery("bench-events", broker=broker, set_as_current=False)
    app.conf.update(event_exchange=exchange, event_queue_ttl=600.0, event_queue_expires=120.0)
    if handler.startswith("loadlab"):
        from loadlab.exporters.exporter_service import _make_receiver_class

        state, handle = (_loadlab_detailed if handler == "loadlab detailed" else _loadlab_counting)()
        seen = lambda: state.events  # noqa: E731
        receiver_class = _make_receiver_class()
        make = lambda conn: receiver_class(conn, handle=handle, on_ready=lambda: None,  # noqa: E731
                                           on_tick=lambda: seen() >= count, app=app)
    else:
        state, handle = _flower()
        seen = lambda: state.event_count  # noqa: E731
        make = lambda conn: app.events.Receiver(conn, handlers={"*": handle})  # noqa: E731
    with app.connection_for_read() as conn:
        receiver = make(conn)
        receiver.node_id = node_id
        receiver.queue = receiver.queue.__class__(
            ".".join([receiver.queue_prefix, node_id]), exchange=receiver.exchange, routing_key="#",
            auto_delete=False, durable=False, message_ttl=600.0, expires=120.0)
        receiver.queue(conn.default_channel).declare()
        print("ready", flush=True)
        sys.stdin.readline()
        started = time.perf_counter()
        for _ in receiver.consume(limit=None, timeout=60, safety_interval=0.2, wakeup=False):
            if seen() >= count:
                break
        print(json.dumps({"seconds": time.perf_counter() - started, "seen": seen()}), flush=True)
        receiver.queue(conn.default_channel).delete()


def end_to_end(broker: str, n_events: int, rounds: int, seed: int) -> dict:
    """Fills each process's event queue with the stream (published by kombu as workers publish events), then lets
    it drain: events / seconds to have handled them all."""
    from kombu import Connection, Exchange, Producer

    from loadlab.bench.overhead import close_stdin_and_wait

    events = generate_stream(n_events, seed=seed)
    exchange_name = f"loadlab-bench-ev-{uuidlib.uuid4().hex[:8]}"
    exchange = Exchange(exchange_name, type="topic")  # as Celery declares its event exchange
    rates: dict[str, list[float]] = {name: [] for name in E2E_HANDLERS}
    with Connection(broker, connect_timeout=3) as conn:
        for round_index in range(rounds):
            for name in random.Random(f"e2e-{seed}-{round_index}").sample(E2E_HANDLERS, len(E2E_HANDLERS)):
                node_id = uuidlib.uuid4().hex
                process = subprocess.Popen(
                    [sys.executable, "-m", "loadlab.bench.events", "consume", "--broker", broker, "--exchange",
                     exchange_name, "--node-id", node_id, "--handler", name, "--events", str(len(events))],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                try:
                    if process.stdout.readline().strip() != "ready":
                        raise RuntimeError(f"the {name} consumer did not start")
                    producer = Producer(conn.default_channel, exchange=exchange, serializer="json")
                    for event in events:
                        producer.publish(event, routing_key=event["type"].replace("-", "."), declare=[exchange])
                    process.stdin.write("go\n")
                    process.stdin.flush()
                    done = json.loads(process.stdout.readline())
                    if done["seen"] < len(events):
                        raise RuntimeError(f"the {name} consumer saw {done['seen']} of {len(events)} events")
                    rates[name].append(len(events) / done["seconds"])
                finally:
                    close_stdin_and_wait(process, 30)
        exchange(conn.default_channel).delete()
    ratios = {name: paired_ratio([r / f for r, f in zip(values, rates[REFERENCE])])
              for name, values in rates.items() if name != REFERENCE}
    return {"events": len(events), "rounds": rounds,
            "events_per_s": {name: {"median": round(sorted(v)[len(v) // 2]), "min": round(min(v)),
                                    "max": round(max(v))} for name, v in rates.items()},
            "ratio_to_flower": {name: {"ratio": r.value, "ci_low": r.low, "ci_high": r.high}
                                for name, r in ratios.items()}}


def _ratio_text(row: dict) -> str:
    from loadlab.bench.verdict import Ratio

    return Ratio(row["ratio"], row["ci_low"], row["ci_high"], 0).text(2)


def render(result: dict) -> str:
    mix = ", ".join(f"{k} {v}" for k, v in result["mix"].items())
    lines = [f"stream: {result['events']} events ({mix}); {result['task_names']} task names, "
             f"{result['workers']} workers",
             f"handlers: {result['rounds']} rounds, order drawn per round, fresh state and a copy of every event "
             f"each; events/s median (min-max), this machine's; x flower: geometric mean [95% CI]"]
    for name, row in result["events_per_s"].items():
        ratio = result["ratio_to_flower"].get(name)
        lines.append(f"  {name:<18} {row['median']:>10,}  ({row['min']:,}-{row['max']:,})"
                     + (f"   x flower {_ratio_text(ratio)}" if ratio else ""))
    for name, reason in result["skipped"].items():
        lines.append(f"  {name:<18} skipped: {reason}")
    lines.append(f"equal work (loadlab detailed / flower) target {target_text(result['target_ratio'])}x: "
                 f"{result['verdict']}")
    e2e = result.get("end_to_end")
    if e2e:
        lines.append(f"end to end: {e2e['events']} events published to {e2e['broker']}, drained by each exporter "
                     f"process ({e2e['rounds']} rounds); events/s median (min-max)")
        for name, row in e2e["events_per_s"].items():
            ratio = e2e["ratio_to_flower"].get(name)
            lines.append(f"  {name:<18} {row['median']:>10,}  ({row['min']:,}-{row['max']:,})"
                         + (f"   x flower {_ratio_text(ratio)}" if ratio else ""))
        lines.append("end to end: message decoding and the broker's delivery included, so a figure of this machine "
                     "and broker, without a target")
    elif result.get("end_to_end_skipped"):
        lines.append(f"end to end: skipped: {result['end_to_end_skipped']}")
    lines.append("checks: " + ", ".join(f"{k}={v}" for k, v in result["checks"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["consume"]:
        parser = argparse.ArgumentParser(prog="loadlab.bench.events consume")
        for option in ("--broker", "--exchange", "--node-id", "--handler"):
            parser.add_argument(option, required=True)
        parser.add_argument("--events", type=int, required=True)
        args = parser.parse_args(argv[1:])
        consume(args.broker, args.exchange, args.node_id, args.handler, args.events)
        return 0
    parser = argparse.ArgumentParser(prog="loadlab bench exporter")
    defaults = ExporterBench()
    parser.add_argument("--events", type=int, default=defaults.events)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--e2e-broker", default=defaults.e2e_broker)
    parser.add_argument("--e2e-events", type=int, default=defaults.e2e_events)
    parser.add_argument("--out", default=None, help="directory to write bench.json to")
    args = parser.parse_args(argv)
    if args.e2e_broker and args.e2e_events:
        problem = _broker_problem(args.e2e_broker)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    result = run(args.events, args.rounds, args.seed)
    if args.e2e_broker and args.e2e_events:
        result["end_to_end"] = {"broker": _masked(args.e2e_broker),
                                **end_to_end(args.e2e_broker, args.e2e_events, args.rounds, args.seed)}
    else:
        result["end_to_end_skipped"] = "no broker given (--e2e-broker amqp://…)"
    print(render(result), flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps({"bench": "exporter", **result}, indent=2) + "\n")
        print(f"wrote {out / 'bench.json'}")
    return 0 if all(result["checks"].values()) else 1


def _broker_problem(url: str) -> str | None:
    """One sentence when ``url`` cannot be the end-to-end broker, else None."""
    if not url.startswith(("amqp://", "amqps://", "pyamqp://")):
        return (f"--e2e-broker {_masked(url)!r} is not an AMQP URL; give one such as amqp://guest:guest@127.0.0.1:5672// "
                "(on Redis, Celery fans events out by pub/sub, which keeps no backlog for a process to drain).")
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001 - any failure is the user's broker: named in one sentence
        return f"--e2e-broker {_masked(url)} is not reachable ({type(exc).__name__}: {exc}); give a running AMQP broker."
    return None


def _masked(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return maybe_sanitize_url(url)


if __name__ == "__main__":
    sys.exit(main())
