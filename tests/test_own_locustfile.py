"""``loadlab run --locustfile FILE``: a locustfile that cannot be run is refused before anything starts, with one
sentence naming the file and what to do, exit 2 (the example locustfile's run is in test_example_projects.py)."""
from __future__ import annotations

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
    assert_refused_before_start(procs, words, tmp_path / "out")  # before the run directory or any process
