"""``loadlab run --locustfile FILE`` (and ``loadlab ui --locustfile FILE``): a locustfile that cannot be run is
refused before anything starts, with one sentence naming the file and what to do, exit 2 (the example locustfile's
run is in test_example_projects.py, its run from the web UI in test_webui.py)."""
from __future__ import annotations

import csv
import json
import os
import subprocess

from tests.conftest import LOADLAB, assert_refused_before_start

LOCUSTFILES = {
    "missing": (None, ["is not a file"]),
    "no-user": ("from locust import task\n\nclass Helper:\n    pass\n", ["defines no User class",
                                                                       "loadlab.loadtests.api.CeleryUser"]),
    "broken-import": ("import orders_nowhere\n", ["cannot be imported", "ModuleNotFoundError", "orders_nowhere"]),
    "syntax": ("def f(:\n", ["cannot be imported", "SyntaxError"]),
    "exits": ("import sys\nsys.exit(3)\n", ["cannot be imported", "SystemExit"]),
    "no-tasks": ("from loadlab.loadtests.api import CeleryUser\n\nclass Shopper(CeleryUser):\n    pass\n",
                 ["Shopper has no tasks", "@task"]),
    "two-shapes": ("from locust import LoadTestShape, task\nfrom loadlab.loadtests.api import CeleryUser\n\n"
                   "class Shopper(CeleryUser):\n    @task\n    def buy(self):\n        self.publish('loadlab.noop')\n\n"
                   "class Ramp(LoadTestShape):\n    def tick(self):\n        return None\n\n"
                   "class Spike(LoadTestShape):\n    def tick(self):\n        return None\n",
                   ["defines 2 load shapes (Ramp, Spike)", "abstract = True"]),
}
GOOD = ("from locust import task\nfrom loadlab.loadtests.api import CeleryUser\n\n"
        "class Shopper(CeleryUser):\n    @task\n    def buy(self):\n        self.publish('loadlab.noop')\n")


def test_a_locustfile_that_cannot_run_is_refused_before_anything_starts(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOADLAB_")}
    procs, words = {}, {}
    for name, (text, expected) in LOCUSTFILES.items():
        path = tmp_path / f"{name}.py"
        if text is not None:
            path.write_text(text)
        words[name] = [f"--locustfile '{path.name}'", *expected]
        procs[name] = subprocess.Popen(
            [LOADLAB, "run", "--locustfile", path.name, "--out", str(tmp_path / "out" / name)],
            cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    (tmp_path / "good.py").write_text(GOOD)
    (tmp_path / "mix.yml").write_text("tasks:\n  - name: loadlab.noop\n")
    procs["with-tasks"] = subprocess.Popen(
        [LOADLAB, "run", "--locustfile", "good.py", "--tasks", "mix.yml", "--out", str(tmp_path / "out" / "with-tasks")],
        cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    words["with-tasks"] = ["--tasks 'mix.yml'", "--locustfile 'good.py'", "give one of them"]
    for command in ("sweep", "serialization"):  # the variable, exported for `locust`, is not taken silently
        procs[command] = subprocess.Popen([LOADLAB, command, "--out", str(tmp_path / "out" / command)], cwd=tmp_path,
                                          env={**env, "LOADLAB_LOCUSTFILE": "good.py"}, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        words[command] = ["LOADLAB_LOCUSTFILE='good.py'", "`loadlab run` and `loadlab ui` only",
                          f"`loadlab {command}`"]
    # `loadlab ui` takes one, checked the same way before the stack or the web UI starts
    for name in ("missing", "no-tasks"):
        procs[f"ui-{name}"] = subprocess.Popen(
            [LOADLAB, "ui", "--locustfile", f"{name}.py", "--out", str(tmp_path / "out" / f"ui-{name}")],
            cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        words[f"ui-{name}"] = words[name]
    assert_refused_before_start(procs, words, tmp_path / "out")  # before the run directory or any process


# what Locust's events tell a locustfile, in order, in events.log beside it (test_webui.py appends it to the
# example's locustfile for `loadlab ui`)
EVENT_LISTENERS = '''
from pathlib import Path

from locust import events

LOG = Path(__file__).with_name("events.log")


def note(line):
    with LOG.open("a") as handle:
        handle.write(line + "\\n")


@events.init.add_listener
def on_init(environment, runner, web_ui, **_):
    note(f"init {type(runner).__name__} web_ui={web_ui is not None}")


@events.test_start.add_listener
def on_test_start(environment, **_):
    note("test_start " + ",".join(sorted(cls.__name__ for cls in environment.user_classes)))


@events.test_stop.add_listener
def on_test_stop(environment, **_):
    note("test_stop")


@events.quitting.add_listener
def on_quitting(environment, **_):
    note("quitting")
'''

EVENTS_LOCUSTFILE = EVENT_LISTENERS + '''
from locust import LoadTestShape, constant, task

from loadlab.loadtests.api import CeleryUser


class TwoSteps(LoadTestShape):
    """1 user, then 2, then the load ends: the shape, not a duration, ends the run."""

    def tick(self):
        run_time = self.get_run_time()
        if run_time < 1.5:
            return 1, 10
        return (2, 10) if run_time < 3.0 else None


class Pinger(CeleryUser):
    wait_time = constant(0.1)

    def on_start(self):
        note(f"on_start {self.settings.run_id != 'adhoc'} {type(self.app).__name__}")

    @task
    def ping(self):
        task_id = self.publish("loadlab.noop", queue=self.settings.queue, priority=1)
        assert task_id
'''


def test_a_locustfiles_event_listeners_users_and_shape_see_the_run(tmp_path, run_dir):
    """Listeners on Locust's module-level events are called as under the locust command, a user has the run's
    settings and app, and what it publishes is in the ledger and Locust's statistics. The file's load shape decides
    the users and ends the load (no --duration; the scenario's own is 30 s). A shell's CELERY_BROKER_URL and
    CELERY_RESULT_BACKEND (which Celery reads before any configuration) do not take the run elsewhere."""
    (tmp_path / "pinger.py").write_text(EVENTS_LOCUSTFILE)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LOADLAB_")},
           "CELERY_BROKER_URL": "redis://127.0.0.1:1/0", "CELERY_RESULT_BACKEND": "redis://127.0.0.1:1/1"}
    result = subprocess.run([LOADLAB, "run", "--locustfile", "pinger.py", "--out", str(run_dir)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "its load shape TwoSteps decides the users and when the load ends" in result.stdout
    with open(run_dir / "locust" / "locust_stats_history.csv") as handle:
        user_counts = [int(row["User Count"]) for row in csv.DictReader(handle)]
    assert 1 in user_counts and max(user_counts) == 2, user_counts  # the shape's two steps
    # the shape's None (its 1 s ticks: at 3 to 4 s) ended the load, not the smoke scenario's 30 s
    assert 2.5 <= json.loads((run_dir / "report.json").read_text())["duration_s"] < 8
    lines = (tmp_path / "events.log").read_text().splitlines()
    assert lines[:2] == ["init LocalRunner web_ui=False", "test_start Pinger"] and lines[-2:] == ["test_stop",
                                                                                                  "quitting"]
    assert lines[2:-2] == ["on_start True Celery"] * 2, lines
    report = json.loads((run_dir / "report.json").read_text())
    tasks = report["tasks"]
    assert tasks["submitted"] > 0 and tasks["lost"] == 0 and tasks["submitted"] == tasks["succeeded"]
    requests = {row["name"]: row for row in report["locust"]["by_request"]}
    assert requests["publish noop"]["failures"] == 0
    assert 0 < requests["publish noop"]["requests"] <= tasks["submitted"]
    assert requests["end_to_end noop"]["requests"] > 0
