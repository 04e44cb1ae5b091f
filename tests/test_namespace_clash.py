"""A user's project with packages of its own named like loadlab's folders (``stack``, ``reports``, ``dashboards``,
``exporters``: common in Django projects) on ``sys.path`` and as the working directory: loadlab imports none of
them, and the user's app keeps its own. Each of the project's look-alike modules fails loudly when imported."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap

from tests.conftest import LOADLAB, processes_mentioning, run_cli, wait_until

LOOK_ALIKES = ["stack/app.py", "stack/settings.py", "stack/worker_app.py", "stack/api.py", "reports/render.py",
               "reports/recorder.py", "dashboards/build.py", "exporters/exporter_service.py", "exporters/tracing.py",
               "loadtests/users.py"]


def _project(root):
    for package in ("stack", "reports", "dashboards", "exporters", "loadtests", "shopapp"):
        (root / package).mkdir()
        (root / package / "__init__.py").write_text("")
    for module in LOOK_ALIKES:
        (root / module).write_text(f"raise ImportError('the project\\'s own {module} was imported by loadlab')\n")
    # the project's own reports package holds a task of its app: the user's package must keep working
    (root / "reports" / "tasks.py").write_text("def summarize(x, y):\n    return x + y\n")
    (root / "shopapp" / "celery_app.py").write_text(textwrap.dedent("""
        from celery import Celery

        from reports.tasks import summarize

        app = Celery("shopapp")
        app.task(name="shopapp.summarize")(summarize)
    """))
    return {"PYTHONPATH": str(root)}


def test_up_with_the_users_app_and_a_run_from_a_project_with_look_alike_packages(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    project_path = _project(project)
    env = {**os.environ, **project_path}
    out = tmp_path / "up"
    proc = subprocess.Popen([LOADLAB, "up", "--app", "shopapp.celery_app:app", "--out", str(out)], cwd=project,
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    try:
        wait_until(lambda: lines.append(proc.stdout.readline()) or "Ctrl-C" in lines[-1] or proc.poll() is not None,
                   120, interval=0, what="the stack to say it is up")
        assert proc.poll() is None, "".join(lines)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, "".join(lines) + proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_until(lambda: not processes_mentioning(str(out)), 15, what="every child to exit")
    logs = "".join(p.read_text() for p in (out / "logs").glob("*.log"))
    assert "was imported by loadlab" not in logs
    assert "shopapp.summarize" in (out / "logs" / "worker1.log").read_text()  # the user's app, its own package

    run = tmp_path / "run"
    result = run_cli("run", "smoke", "--duration", "3s", "--out", str(run), cwd=project, env=project_path,
                     timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((run / "report.json").read_text())
    assert report["tasks"]["submitted"] > 0 and report["tasks"]["lost"] == 0
    assert "was imported by loadlab" not in "".join(p.read_text() for p in (run / "logs").glob("*.log"))
    wait_until(lambda: not processes_mentioning(str(run)), 15, what="every child to exit")
