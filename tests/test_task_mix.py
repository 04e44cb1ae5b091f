"""Task-mix files (``--tasks``) for the user's own app: parsed and checked against the app's registered tasks and
their signatures before anything starts (one sentence, exit 2), ``loadlab tasks`` lists the tasks and writes a first
file, and a run from the user's project directory publishes the app's tasks and accounts for every one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from celery import Celery

from loadlab.loadtests.task_mix import IntRange, OneOf, TaskMixError, Text, check_against, parse_file, starting_file
from tests.conftest import LOADLAB, assert_refused_before_start, processes_mentioning, run_cli, wait_until

SHOP_APP = '''
import random

from celery import Celery

from reports.tasks import summarize

app = Celery("shopapp", broker="redis://127.0.0.1:1/0")  # its own URL: loadlab points it at the stack's broker
app.conf.task_routes = {"shopapp.tasks.charge": {"queue": "payments"}}  # consumed by the run's workers
app.conf.worker_prefetch_multiplier = 8  # its own: --prefetch-multiplier overrides it, and the report says so
app.task(name="shopapp.summarize")(summarize)


class Declined(Exception):
    pass


@app.task(name="shopapp.tasks.add")
def add(x, y):
    return x + y


@app.task(name="shopapp.tasks.charge", bind=True, autoretry_for=(Declined,), max_retries=5, retry_backoff=False,
          default_retry_delay=0)
def charge(self, order_id: int, amount: float, note: str = ""):
    if random.random() < 0.3:
        raise Declined(f"order {order_id} declined")
    return round(amount, 2)
'''

LOAD_HOOKS = '''
import random


def summarize_args():
    return [random.randint(1, 9), 4], {}


def broken():
    return "not a pair"
'''

GOOD_MIX = """\
tasks:
  - name: shopapp.tasks.add
    weight: 3
    args: [2, {$range: [1, 100]}]
  - name: shopapp.tasks.charge
    weight: 2
    kwargs: {order_id: {$range: [1, 1000]}, amount: {$one_of: [9.5, 20]}, note: {$bytes: 64}}
  - name: shopapp.summarize
    hook: shopapp.load:summarize_args
"""


def write_project(root):
    """A user's project: its app in shopapp/, a task of it in its own ``reports`` package (a name loadlab uses for a
    folder), look-alike ``stack``/``exporters`` packages that fail when imported."""
    for package in ("shopapp", "reports", "stack", "exporters"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    for module in ("stack/app.py", "stack/tasks.py", "exporters/ledger_hooks.py"):
        (root / module).write_text(f"raise ImportError('the project\\'s own {module} was imported by loadlab')\n")
    (root / "reports" / "tasks.py").write_text("def summarize(x, y):\n    return x + y\n")
    (root / "shopapp" / "celery.py").write_text(textwrap.dedent(SHOP_APP))
    (root / "shopapp" / "load.py").write_text(textwrap.dedent(LOAD_HOOKS))
    (root / "tasks.yml").write_text(GOOD_MIX)
    return root


def _registry():
    app = Celery("registry-test", set_as_current=False)

    @app.task(name="t.add")
    def add(x, y):
        return x + y

    @app.task(name="t.charge", bind=True)
    def charge(self, order_id: int, amount: float = 1.0):
        return amount

    return {name: task for name, task in app.tasks.items() if not name.startswith("celery.")}


def _mix(tmp_path, text):
    path = tmp_path / "mix.yml"
    path.write_text(text)
    return parse_file(path)


def test_generators_draw_within_their_spec_and_fixed_values_stay(tmp_path):
    mix = _mix(tmp_path, "tasks:\n  - name: t.add\n    args: [{$range: [3, 5]}, {$one_of: [a, [1, 2]]}]\n"
                         "  - name: t.charge\n    kwargs: {order_id: 7, amount: {$bytes: 10}}\n    countdown: 1\n"
                         "    priority: 3\n")
    add, charge = mix.tasks
    assert isinstance(add.args[0], IntRange) and isinstance(add.args[1], OneOf)
    seen = {add.arguments()[0][0] for _ in range(300)}
    assert seen == {3, 4, 5}
    assert {str(add.arguments()[0][1]) for _ in range(100)} == {"a", "[1, 2]"}
    assert isinstance(charge.kwargs["amount"], Text)
    args, kwargs = charge.arguments()
    assert args == [] and kwargs["order_id"] == 7 and len(kwargs["amount"]) == 10
    assert charge.options == {"countdown": 1, "priority": 3}
    check_against(mix, _registry(), "json")  # binds: no exception


@pytest.mark.parametrize("text, words", [
    ("tasks:\n  - name: t.ad\n", ["line 2", "'t.ad'", "did you mean 't.add'", "t.charge"]),
    ("tasks:\n  - name: t.add\n    args: [1, 2, 3]\n", ["line 2", "'t.add'", "do not bind", "(x, y)"]),
    ("tasks:\n  - name: t.charge\n    kwargs: {order: 1}\n", ["'t.charge'", "do not bind", "order_id"]),
])
def test_names_and_arguments_are_checked_against_the_apps_tasks(tmp_path, text, words):
    with pytest.raises(TaskMixError) as caught:
        check_against(_mix(tmp_path, text), _registry(), "json")
    message = str(caught.value)
    assert "\n" not in message and message.endswith(".")
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("text, words", [
    ("tasks: [\n", ["not valid YAML", "line 2"]),
    ("tasks:\n  - name: t.add\n    name: t.charge\n", ["duplicate key 'name'"]),
    ("jobs:\n  - name: t.add\n", ["no top-level 'tasks:'"]),
    ("tasks: []\n", ["non-empty list"]),
    ("tasks:\n  - t.add\n", ["entry 1", "mapping"]),
    ("tasks:\n  - weight: 2\n", ["line 2", "no task name"]),
    ("tasks:\n  - name: t.add\n    wieght: 2\n", ["'wieght'", "did you mean 'weight'"]),
    ("tasks:\n  - name: t.add\n    weight: 0\n", ["weight 0", "greater than 0"]),
    ("tasks:\n  - name: t.add\n    args: {$range: [9, 1]}\n", ["args", "not a list"]),
    ("tasks:\n  - name: t.add\n    args: [{$range: [9, 1]}, 1]\n", ["'t.add'", "$range [9, 1]", "low <= high"]),
    ("tasks:\n  - name: t.add\n    args: [{$range: [1]}, 1]\n", ["$range [1]", "two whole numbers"]),
    ("tasks:\n  - name: t.add\n    args: [{$rnd: 3}, 1]\n", ["not a value generator", "$one_of"]),
    ("tasks:\n  - name: t.add\n    args: [{$bytes: -1}, 1]\n", ["$bytes -1", "whole number of bytes"]),
    ("tasks:\n  - name: t.add\n    priority: 300\n", ["priority 300", "0 to 255"]),
    ("tasks:\n  - name: t.add\n    expires: 0\n", ["expires 0", "greater than 0"]),
    ("tasks:\n  - name: t.add\n    queue: a b\n", ["queue 'a b'", "queue name"]),
    ("tasks:\n  - name: t.add\n    hook: nope\n", ["hook 'nope'", "module:function"]),
    ("tasks:\n  - name: t.add\n    hook: no_such_module_x:f\n", ["hook 'no_such_module_x:f'", "cannot be imported"]),
    ("tasks:\n  - name: t.add\n    hook: os:sep\n", ["hook 'os:sep'", "not a function"]),
    ("tasks:\n  - name: t.add\n    hook: os:getcwd\n    args: [1]\n", ["either a hook or args/kwargs"]),
])
def test_malformed_files_get_one_sentence_naming_the_line_or_task(tmp_path, text, words):
    with pytest.raises(TaskMixError) as caught:
        _mix(tmp_path, text)
    message = str(caught.value)
    assert "\n" not in message and message.endswith("."), message
    assert "mix.yml" in message
    for word in words:
        assert word in message, message


def test_a_hook_that_returns_no_pair_is_refused(tmp_path):
    mix = _mix(tmp_path, "tasks:\n  - name: t.add\n    hook: os:getcwd\n")
    with pytest.raises(TaskMixError) as caught:
        check_against(mix, _registry(), "json")
    assert "hook 'os:getcwd' did not return (args, kwargs)" in str(caught.value)


def test_the_starting_file_lists_every_task_and_binds(tmp_path):
    registry = _registry()
    path = tmp_path / "start.yml"
    path.write_text(starting_file(registry))
    mix = parse_file(path)
    assert [t.name for t in mix.tasks] == list(registry)
    by_name = {t.name: t for t in mix.tasks}
    assert by_name["t.charge"].kwargs == {"order_id": 1}  # required only; the annotated type's placeholder
    assert by_name["t.add"].kwargs == {"x": None, "y": None}
    check_against(mix, registry, "json")


BAD_FILES = {
    "unknown-task": ("tasks:\n  - name: shopapp.tasks.ad\n", ["line 2", "'shopapp.tasks.ad'", "shopapp.tasks.add"]),
    "not-binding": ("tasks:\n  - name: shopapp.tasks.charge\n    kwargs: {amount: 1}\n",
                    ["'shopapp.tasks.charge'", "do not bind", "order_id"]),
    "malformed": ("tasks:\n  - name: [shopapp\n", ["not valid YAML", "line"]),
    "bad-range": ("tasks:\n  - name: shopapp.tasks.add\n    args: [1, {$range: [5, 2]}]\n", ["$range [5, 2]"]),
    "bad-hook": ("tasks:\n  - name: shopapp.summarize\n    hook: shopapp.load:broken\n",
                 ["hook 'shopapp.load:broken'", "(args, kwargs)"]),
    "hook-missing": ("tasks:\n  - name: shopapp.summarize\n    hook: shopapp.nothing:f\n", ["cannot be imported"]),
}


def test_the_cli_refuses_bad_task_mix_files_before_anything_starts(tmp_path):
    project = write_project(tmp_path / "project")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOADLAB_")}
    procs = {}
    for name, (text, _words) in BAD_FILES.items():
        (project / f"{name}.yml").write_text(text)
        procs[name] = subprocess.Popen(
            [LOADLAB, "run", "--app", "shopapp.celery:app", "--tasks", f"{name}.yml", "--out", str(tmp_path / name)],
            cwd=project, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs["no-app"] = subprocess.Popen([LOADLAB, "run", "--app", "shopapp.nowhere:app", "--tasks", "tasks.yml",
                                        "--out", str(tmp_path / "no-app")], cwd=project, env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    words = {**{name: w for name, (_t, w) in BAD_FILES.items()}, "no-app": ["--app 'shopapp.nowhere:app'",
                                                                          "cannot be imported"]}
    assert_refused_before_start(procs, words, tmp_path)


def test_loadlab_tasks_lists_the_apps_tasks_and_writes_a_file_that_validates(tmp_path):
    project = write_project(tmp_path / "project")
    result = run_cli("tasks", "--app", "shopapp.celery:app", "--write", "start.yml", cwd=project, timeout=60)
    assert result.returncode == 0, result.stderr
    for name in ("shopapp.summarize", "shopapp.tasks.add", "shopapp.tasks.charge"):
        assert name in result.stdout
    assert "(order_id: int, amount: float, note: str = '')" in result.stdout
    again = run_cli("tasks", "--app", "shopapp.celery:app", "--write", "start.yml", cwd=project, timeout=60)
    assert again.returncode == 2 and "--force" in again.stderr
    check = subprocess.run([sys.executable, "-c", (
        "from loadlab.config.settings import Settings;from loadlab.loadtests.task_mix import load_task_mix;"
        "print(len(load_task_mix(Settings(app='shopapp.celery:app', tasks='start.yml')).tasks))")],
        cwd=project, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and check.stdout.strip() == "3", check.stderr


def test_a_run_from_the_users_project_publishes_its_tasks_and_accounts_for_each(tmp_path, run_dir):
    project = write_project(tmp_path / "project")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOADLAB_") and k != "PYTHONPATH"}
    result = subprocess.run([LOADLAB, "run", "--app", "shopapp.celery:app", "--tasks", "tasks.yml", "--duration",
                             "4s", "--users", "4", "--prefetch-multiplier", "2", "--out", str(run_dir)], cwd=project, env=env, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    tasks = report["tasks"]
    assert tasks["submitted"] > 0 and tasks["lost"] == 0
    assert tasks["submitted"] == tasks["succeeded"] + tasks["failed"] + tasks.get("revoked", 0) + tasks["lost"]
    assert set(report["latency_ms_extra"]["end_to_end_by_task"]) == {"shopapp.tasks.add", "shopapp.tasks.charge",
                                                                     "shopapp.summarize"}
    assert report["retries"]["tasks_retried"] > 0 and report["retries"]["exceptions"].get("Declined", 0) > 0
    assert report["latency_ms"]["execution"]["count"] > 0 and report["latency_ms"]["queue_wait"]["count"] > 0
    worker_log = (run_dir / "logs" / "worker1.log").read_text()
    assert "payments" in worker_log  # the queue the app routes charge to is consumed
    # loadlab's flag over the app's own configuration, named; what it left alone shown; the app's URL replaced
    app_config = report["app_config"]
    assert json.loads((run_dir / "settings.json").read_text())["app_config"] == app_config
    rows = {row["setting"]: row for row in app_config["settings"]}
    assert rows["worker_prefetch_multiplier"] == {"setting": "worker_prefetch_multiplier", "app": 8, "loadlab": 2,
                                                  "effective": 2, "by": "--prefetch-multiplier"}
    assert rows["task_serializer"]["loadlab"] is None and rows["task_serializer"]["by"] == "Celery default"
    assert any("--prefetch-multiplier" in line and "8" in line for line in app_config["contradicted"])
    assert app_config["replaced"]["broker_url"]["app"] == "redis://127.0.0.1:1/0"
    assert "was imported by loadlab" not in "".join(p.read_text() for p in (run_dir / "logs").glob("*.log"))
    wait_until(lambda: not processes_mentioning(str(run_dir)), 15, what="every child to exit")
