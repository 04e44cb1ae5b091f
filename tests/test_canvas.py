"""Canvas accounting on a real stack: tasks that start tasks (a chain, a group, a chord, ``.delay()`` in a task) from
inside a worker. Every task published from a worker is in the ledger once, with the parent and root Celery's headers
give it; the drain waits for a chain's links published after the load stopped; the report's ``workflows`` section
counts each root's workflow with its tasks and its time from the root's first publish to the last result.

The tasks write what Celery's own request says of them (id, parent, root) to a file, the truth the ledger is held to.
"""
from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections import Counter

from loadlab.config.settings import Settings
from loadlab.exporters import ledger
from loadlab.reports.recorder import Recorder
from loadlab.stack.supervisor import Stack
from tests.conftest import LOADLAB, processes_mentioning, unique, wait_until

CANVAS_APP = '''
import json
import os
import time

from celery import Celery, chain, chord, group

app = Celery("canvasapp", broker="redis://127.0.0.1:1/0")


def _truth(task):
    path = os.environ.get("CANVAS_TRUTH")
    if path:  # one short O_APPEND write per task: whole lines whatever the processes
        request = task.request
        line = json.dumps({"id": request.id, "parent": request.parent_id, "root": request.root_id, "task": task.name})
        with open(path, "a") as out:
            out.write(line + "\\n")


@app.task(name="canvasapp.step", bind=True)
def step(self, x, ms):
    _truth(self)
    time.sleep(ms / 1000)
    return x + 1


@app.task(name="canvasapp.leaf", bind=True)
def leaf(self, x):
    _truth(self)
    return x


@app.task(name="canvasapp.total", bind=True)
def total(self, values):
    _truth(self)
    return sum(values)


@app.task(name="canvasapp.start_chain", bind=True)
def start_chain(self, n, ms):
    _truth(self)
    chain(step.s(0, ms), *[step.s(ms) for _ in range(n - 1)]).apply_async()


@app.task(name="canvasapp.start_group", bind=True)
def start_group(self, n):
    _truth(self)
    group(leaf.s(i) for i in range(n)).apply_async()


@app.task(name="canvasapp.start_chord", bind=True)
def start_chord(self, n):
    _truth(self)
    chord([leaf.s(i) for i in range(n)], total.s()).apply_async()


@app.task(name="canvasapp.spawn", bind=True)
def spawn(self):
    _truth(self)
    leaf.delay(1)
'''

STEP_MS, LINKS = 100, 3
MIX = f"""\
tasks:
  - name: canvasapp.start_chain
    kwargs: {{n: {LINKS}, ms: {STEP_MS}}}
  - name: canvasapp.start_group
    kwargs: {{n: 3}}
  - name: canvasapp.start_chord
    kwargs: {{n: 3}}
  - name: canvasapp.spawn
"""
# tasks in each root's workflow, the root included
DESIGNED = {"canvasapp.start_chain": 1 + LINKS, "canvasapp.start_group": 4, "canvasapp.start_chord": 5,
            "canvasapp.spawn": 2}


def _project(root):
    (root / "canvasapp").mkdir(parents=True)
    (root / "canvasapp" / "__init__.py").write_text("")
    (root / "canvasapp" / "celery.py").write_text(textwrap.dedent(CANVAS_APP))
    (root / "tasks.yml").write_text(MIX)
    return root


def _truth(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_run_of_a_canvas_accounts_every_child_and_reports_each_workflow(tmp_path, run_dir):
    project = _project(tmp_path / "project")
    truth_path = tmp_path / "truth.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOADLAB_") and k != "PYTHONPATH"}
    env["CANVAS_TRUTH"] = str(truth_path)
    result = subprocess.run([LOADLAB, "run", "--app", "canvasapp.celery:app", "--tasks", "tasks.yml", "--duration",
                             "3s", "--users", "2", "--concurrency", "4", "--out", str(run_dir)], cwd=project, env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    truth = _truth(truth_path)
    roots = [t for t in truth if t["parent"] is None]
    children = [t for t in truth if t["parent"] is not None]
    tasks = report["tasks"]
    assert tasks["lost"] == 0 and tasks["failed"] == 0
    assert tasks["submitted"] == tasks["succeeded"] + tasks["failed"] + tasks["revoked"] + tasks["lost"]
    # every task that ran was submitted once: the roots the producer published and the children workers published
    assert tasks["submitted"] == len(truth) == len({t["id"] for t in truth})
    assert tasks["children"] == len(children) > 0
    # the roots published, by name (Locust's publish counts can miss the one a user was stopped in)
    published = Counter(t["task"] for t in roots)
    assert set(published) == set(DESIGNED)
    workflows = report["workflows"]
    assert workflows["count"] == len(roots) and workflows["unfinished"] == 0
    for name, n in published.items():
        by_root = workflows["by_root"][name]
        assert by_root["count"] == n and by_root["tasks_per_workflow"] == {str(DESIGNED[name]): n}, (name, by_root)
    assert workflows["children_by_task"] == dict(Counter(t["task"] for t in children))
    assert workflows["tasks_mean"] == round(len(truth) / len(roots), 3)
    chains = workflows["by_root"]["canvasapp.start_chain"]["end_to_end_ms"]
    assert chains["count"] == published["canvasapp.start_chain"]
    assert chains["p50"] >= LINKS * STEP_MS and chains["mean"] >= LINKS * STEP_MS  # its links run one after another
    # a chain's workflow ends with its last link: longer than the root task alone
    assert chains["p50"] > report["latency_ms_extra"]["end_to_end_by_task"]["canvasapp.start_chain"]["p50"]
    html, summary = (run_dir / "report.html").read_text(), (run_dir / "summary.md").read_text()
    assert "Workflows (tasks that started tasks)" in html and "published by a task" in html
    assert f"| canvasapp.start_chain | {published['canvasapp.start_chain']:,} | {1 + LINKS} |" in summary
    assert f"{len(children):,} of the submitted tasks were published by other tasks" in summary
    wait_until(lambda: not processes_mentioning(str(run_dir)), 15, what="every child to exit")


class _Tap(Recorder):
    """The recorder, keeping each SENT record's task, parent and root as they came through the ledger."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent: dict[str, list] = {}  # task id -> [(name, sent_at, parent_id, root_id), ...]

    def handle(self, record: list) -> None:
        if record[0] == ledger.SENT:
            self.sent.setdefault(record[1], []).append((record[2], record[3], record[6], record[7]))
        super().handle(record)


def test_children_published_by_workers_are_in_the_ledger_with_their_parent_and_the_drain_waits_for_them(
        tmp_path, run_dir, monkeypatch):
    project = _project(tmp_path / "project")
    truth_path = tmp_path / "truth.jsonl"
    monkeypatch.chdir(project)  # the workers import the app from the project, as `loadlab run` does
    monkeypatch.syspath_prepend(str(project))
    monkeypatch.setenv("CANVAS_TRUTH", str(truth_path))
    settings = Settings.build(run_id=unique(), queue=unique("loadlab-canvas-"), app="canvasapp.celery:app",
                              workers="1", concurrency="4", metrics="off")
    with Stack(settings, run_dir, api=False) as stack:
        from loadlab.stack.app import make_app

        recorder = _Tap(stack.settings.ledger_url, stack.settings.run_id).start()
        try:
            app = make_app(stack.settings)  # the producer, with the ledger's publish hooks, as Locust's users
            link_ms = 400
            roots = {app.send_task("canvasapp.start_chain", kwargs={"n": LINKS, "ms": link_ms}).id: "start_chain",
                     app.send_task("canvasapp.start_group", kwargs={"n": 3}).id: "start_group",
                     app.send_task("canvasapp.start_chord", kwargs={"n": 3}).id: "start_chord",
                     app.send_task("canvasapp.spawn").id: "spawn"}
            wait_until(lambda: set(roots) <= set(recorder.sent), 30, what="the roots' SENT")
            recorder.mark_load_stopped()  # the chain's later links are published after this, during the drain
            assert recorder.drain(60), f"{recorder.outstanding} task(s) not finished by the drain's deadline"
            summary = recorder.summary()
            stopped_at = recorder.load_stopped_at
        finally:
            recorder.close()
    truth = _truth(truth_path)
    assert len(truth) == len({t["id"] for t in truth}) == 4 + LINKS + 3 + (3 + 1) + 1
    assert set(recorder.sent) == {t["id"] for t in truth}
    for t in truth:
        sent = recorder.sent[t["id"]]
        assert len(sent) == 1, (t, sent)  # in the ledger once
        name, _sent_at, parent_id, root_id = sent[0]
        assert name == t["task"]
        if t["parent"] is None:
            assert t["id"] in roots and (parent_id, root_id) == (None, None)
        else:  # a child: its parent and root as Celery's request has them
            assert (parent_id, root_id) == (t["parent"], t["root"]) and t["root"] in roots, (t, sent)
    chain_root = next(i for i, name in roots.items() if name == "start_chain")
    links = [recorder.sent[t["id"]][0] for t in truth if t["root"] == chain_root and t["id"] != chain_root]
    assert len(links) == LINKS and max(sent_at for _n, sent_at, _p, _r in links) > stopped_at  # sent in the drain
    tasks = summary["tasks"]
    assert (tasks["submitted"], tasks["succeeded"], tasks["lost"]) == (len(truth), len(truth), 0)
    assert tasks["pending_at_end"] > 0 and tasks["children"] == len(truth) - len(roots)
    workflows = summary["workflows"]
    assert workflows["count"] == len(roots) and workflows["unfinished"] == 0
    assert {name: w["tasks_per_workflow"] for name, w in workflows["by_root"].items()} == {
        name: {str(n): 1} for name, n in DESIGNED.items()}
    chain = workflows["by_root"]["canvasapp.start_chain"]["end_to_end_ms"]  # one workflow: every figure is its own
    assert chain["count"] == 1 and chain["max"] >= LINKS * link_ms
    assert not recorder.workflows and not recorder.members
