"""Pacing of Locust users: Locust's constant_throughput against the random-phase pacing, side by side in one real
Locust run (same machine, same moment), and the open model's Poisson gaps."""
import json
import subprocess
import sys

import numpy as np
from scipy import stats

from loadlab.loadtests.pacing import constant_throughput_random_phase, poisson_gap

RATE, USERS, CYCLE = 8, 40, 0.125


def _largest_share_in_a_slot(times: list[float], slot_s: float = 0.02) -> float:
    """The largest share of sends that fall in one slot_s slot of the cycle (1.0: every user fires together)."""
    t = np.asarray(times)
    phases = ((t - t.min()) % CYCLE // slot_s).astype(int)
    return np.bincount(phases).max() / len(t)


# Locust monkey-patches the process when imported: the run goes in a child process of its own
LOCUST_RUN = f"""
from gevent import monkey; monkey.patch_all()
import json, sys, time
import gevent
from locust import User, constant_throughput, task
from locust.env import Environment
from loadlab.loadtests.pacing import constant_throughput_random_phase

sends = {{"lockstep": [], "phased": []}}

class Lockstep(User):
    wait_time = constant_throughput({RATE})
    @task
    def send(self):
        sends["lockstep"].append(time.time())

class Phased(User):
    wait_time = constant_throughput_random_phase({RATE})
    @task
    def send(self):
        sends["phased"].append(time.time())

runner = Environment(user_classes=[Lockstep, Phased]).create_local_runner()
runner.start({2 * USERS}, spawn_rate=1000)  # every user at once, as a spawn of many users does
gevent.sleep(3)
runner.quit()
json.dump(sends, sys.stdout)
"""


def test_random_phase_pacing_desynchronizes_users_that_locust_keeps_in_lockstep():
    done = subprocess.run([sys.executable, "-c", LOCUST_RUN], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    sends = json.loads(done.stdout)
    after_spawn = {name: [t for t in times if t > min(times) + 0.5] for name, times in sends.items()}
    lockstep, phased = (_largest_share_in_a_slot(after_spawn[name]) for name in ("lockstep", "phased"))
    assert lockstep > 0.6, lockstep
    assert phased < 0.35, phased
    for name in sends:  # both keep the rate
        rate = len(after_spawn[name]) / (max(after_spawn[name]) - min(after_spawn[name])) / USERS
        assert abs(rate - RATE) / RATE < 0.15, (name, rate)


def test_the_first_wait_is_a_uniform_phase_then_one_cycle_each():
    class Someone:
        pass

    wait = constant_throughput_random_phase(RATE)
    users = [Someone() for _ in range(2000)]
    phases = [wait(user) for user in users]
    assert stats.kstest(np.asarray(phases) / CYCLE, "uniform").pvalue > 1e-3
    second = wait(users[0])  # called at once after the first wait: the next send is one cycle after the first
    assert abs(second - (phases[0] + CYCLE)) < 0.05


def test_open_model_gaps_are_exponential():
    gaps = np.asarray([poisson_gap(0.2) for _ in range(5000)])
    assert abs(gaps.mean() - 0.2) / 0.2 < 0.05
    assert stats.kstest(gaps, "expon", args=(0, 0.2)).pvalue > 1e-3
