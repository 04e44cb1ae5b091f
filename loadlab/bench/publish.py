"""``loadlab bench publish``: a raw ``send_task`` loop against the Locust Celery user (one user, no wait) in one
process, on the same stack and settings, in short rounds (A B, then B A); prints both publish rates and their
ratio per round, judged against the target by :mod:`loadlab.bench.verdict` (the method of every bench)."""
from __future__ import annotations

import time
from pathlib import Path

import gevent
from locust import constant
from locust.env import Environment
from locust.event import Events

from loadlab.bench.verdict import paired_ratio, target_text
from loadlab.config.settings import Settings
from loadlab.loadtests.scenarios import Scenario, TaskChoice
from loadlab.loadtests.api import celery_client
from loadlab.loadtests.users import build_user_classes
from loadlab.stack.supervisor import Stack
from loadlab.stack.tasks import full_name

TARGET_RATIO = 0.90  # issue #21: the Locust Celery user publishes at >= 0.90 x a raw send_task loop
NOOP_ONLY = Scenario("bench-publish", "noop publishes", users=1, spawn_rate=1, duration_s=5, rate_per_user=1,
                     mix=(TaskChoice("noop", 1),))


def raw_loop(settings: Settings, seconds: float) -> tuple[float, float]:
    """Publishes per wall-clock second and per CPU second of this process."""
    app = celery_client(settings)
    name = full_name("noop")
    sent = 0
    end = time.perf_counter() + seconds
    started, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() < end:
        app.send_task(name)
        sent += 1
    return sent / (time.perf_counter() - started), sent / (time.process_time() - cpu)


def locust_user(settings: Settings, seconds: float) -> tuple[float, float]:
    """Publishes per wall-clock second and per CPU second of this process (Locust's own greenlets included)."""
    classes = build_user_classes(settings, NOOP_ONLY)
    for cls in classes:
        cls.wait_time = constant(0)
    env = Environment(user_classes=classes, events=Events())
    published = []
    env.events.request.add_listener(lambda name, **_: published.append(1) if name.startswith("publish") else None)
    runner = env.create_local_runner()
    runner.start(1, spawn_rate=100)
    gevent.sleep(0.2)  # let the user spawn before the window opens
    published.clear()
    started, cpu = time.perf_counter(), time.process_time()
    gevent.sleep(seconds)
    count = len(published)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    runner.quit()
    return count / elapsed, count / cpu


def wait_for_empty_queue(app, queue: str, timeout: float = 120.0) -> None:
    """Each side starts with the workers idle, so neither competes with the other's backlog for CPU."""
    from kombu.exceptions import ChannelError

    deadline = time.monotonic() + timeout
    with app.connection_for_write() as conn:
        while time.monotonic() < deadline:
            try:
                if not conn.default_channel.queue_declare(queue, passive=True).message_count:
                    return
            except ChannelError:  # Redis drops the key of an empty list: no queue means nothing queued
                return
            gevent.sleep(0.1)


def bench_publish(settings: Settings, run_dir: Path, rounds: int, seconds: float, console) -> dict:
    """Each round runs both sides (A B, then B A). Two figures per side: publishes per wall-clock second (what the
    target is about, and what neighbours on a shared machine disturb most) and per CPU second of the publishing
    process (the cost of a publish, hardly moved by a neighbour taking the CPU away between two publishes)."""
    with Stack(settings, run_dir, api=False) as stack:
        s = stack.settings
        app = celery_client(s)
        raw_loop(s, 0.5)  # warm the connection pool
        locust_user(s, 0.5)  # and the user's classes and greenlets: the first round is no different from the others
        raw, user = [], []
        for index in range(rounds):
            # A B, then B A: whichever goes second in a round gets the warmer caches, so alternate
            sides = [("raw", raw_loop, raw), ("user", locust_user, user)]
            for _name, measure, into in (sides if index % 2 == 0 else sides[::-1]):
                wait_for_empty_queue(app, s.queue)
                into.append(measure(s, seconds))
            console.print(f"round {index + 1}: raw send_task {raw[-1][0]:.0f}/s ({raw[-1][1]:.0f} per CPU s), "
                          f"Locust Celery user {user[-1][0]:.0f}/s ({user[-1][1]:.0f} per CPU s)")
    result = {"rounds": rounds, "target_ratio": TARGET_RATIO,
              "raw_per_s": [r[0] for r in raw], "user_per_s": [u[0] for u in user],
              "raw_per_cpu_s": [r[1] for r in raw], "user_per_cpu_s": [u[1] for u in user]}
    for figure, index in (("wall", 0), ("cpu", 1)):
        ratio = paired_ratio([u[index] / r[index] for u, r in zip(user, raw)])
        result[figure] = {"ratio": ratio.value, "ci_low": ratio.low, "ci_high": ratio.high,
                          "verdict": ratio.verdict(TARGET_RATIO)}
    return result


def render(result: dict) -> str:
    from statistics import median

    from loadlab.bench.verdict import Ratio

    lines = []
    for figure, unit, label in (("wall", "per_s", "publishes/s (this machine's wall clock)"),
                                ("cpu", "per_cpu_s", "publishes per CPU second of the publishing process")):
        row = result[figure]
        ratio = Ratio(row["ratio"], row["ci_low"], row["ci_high"], result["rounds"])
        lines.append(f"{label}: raw send_task {median(result['raw_' + unit]):.0f}, Locust Celery user "
                     f"{median(result['user_' + unit]):.0f} (medians of {result['rounds']} rounds); "
                     f"user/raw {ratio.text()} (geometric mean [95% CI]), target "
                     f"{target_text(result['target_ratio'])}: {row['verdict']}")
    return "\n".join(lines)
