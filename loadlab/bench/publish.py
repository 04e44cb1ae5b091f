"""``loadlab bench publish``: a raw ``send_task`` loop against the Locust Celery user (one user, no wait) in one
process, on the same stack and settings, interleaved A B A B; prints both publish rates and their ratio."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import gevent
from locust import constant
from locust.env import Environment
from locust.event import Events

from loadlab.config.settings import Settings
from loadlab.loadtests.scenarios import Scenario, TaskChoice
from loadlab.loadtests.users import build_user_classes, celery_client
from loadlab.stack.supervisor import Stack
from loadlab.stack.tasks import full_name

NOOP_ONLY = Scenario("bench-publish", "noop publishes", users=1, spawn_rate=1, duration_s=5, rate_per_user=1,
                     mix=(TaskChoice("noop", 1),))


def raw_loop(settings: Settings, seconds: float) -> float:
    app = celery_client(settings)
    name = full_name("noop")
    sent = 0
    end = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < end:
        app.send_task(name)
        sent += 1
    return sent / (time.perf_counter() - started)


def locust_user(settings: Settings, seconds: float) -> float:
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
    started = time.perf_counter()
    gevent.sleep(seconds)
    count = len(published)
    elapsed = time.perf_counter() - started
    runner.quit()
    return count / elapsed


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
    with Stack(settings, run_dir, api=False) as stack:
        s = stack.settings
        app = celery_client(s)
        raw_loop(s, 0.5)  # warm the connection pool
        raw, user = [], []
        for index in range(rounds):
            # A B, then B A: whichever goes second in a round gets the warmer caches, so alternate
            sides = [("raw", raw_loop, raw), ("user", locust_user, user)]
            for _name, measure, into in (sides if index % 2 == 0 else sides[::-1]):
                wait_for_empty_queue(app, s.queue)
                into.append(measure(s, seconds))
            console.print(f"round {index + 1}: raw send_task {raw[-1]:.0f}/s, Locust Celery user {user[-1]:.0f}/s")
    ratios = [u / r for u, r in zip(user, raw)]
    return {"raw_per_s": statistics.median(raw), "user_per_s": statistics.median(user),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
