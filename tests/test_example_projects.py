"""The example projects in examples/ run end to end as a user runs them: from the project's own directory (a copy,
so the repository stays clean), with the project's Celery app and its task mix or locustfile, on loadlab's stack;
each report accounts for every task. examples/djangoshop is laid out as a Django project (its own ``reports`` app,
mail and billing routed to queues of their own); examples/fastapi_orders is a FastAPI + Celery service whose
payment task retries with backoff and whose checkout runs a chain."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loadlab.config.settings import Settings
from loadlab.stack.embedded import free_port
from loadlab.stack.supervisor import Stack
from tests.conftest import LOADLAB, REPO, processes_mentioning, unique, wait_until

EXAMPLES = REPO / "examples"


def _project(name: str, tmp_path):
    project = tmp_path / name
    shutil.copytree(EXAMPLES / name, project, ignore=shutil.ignore_patterns("__pycache__"))
    return project


def _run(project, run_dir, *args, env: dict | None = None) -> dict:
    """``loadlab run --duration 8s`` from the project's directory, as a user's shell has it (no LOADLAB_* variable,
    no PYTHONPATH; ``env`` on top); the report, after checking that its ledger adds up and nothing was lost."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LOADLAB_") and k != "PYTHONPATH"}, **(env or {})}
    result = subprocess.run([LOADLAB, "run", *args, "--duration", "8s", "--out", str(run_dir)], cwd=project, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    tasks = report["tasks"]
    assert tasks["submitted"] > 0 and tasks["lost"] == 0, tasks
    assert tasks["submitted"] == tasks["succeeded"] + tasks["failed"] + tasks["revoked"] + tasks["lost"], tasks
    wait_until(lambda: not processes_mentioning(str(run_dir)), 15, what="every child to exit")
    return report


def _succeeded_by_queue_and_task(run_dir) -> dict[tuple[str, str], float]:
    """(queue, task) -> tasks the workers finished successfully, from their final /metrics scrape."""
    counts: dict[tuple[str, str], float] = {}
    for path in (run_dir / "metrics").glob("w*.prom"):
        for family in text_string_to_metric_families(path.read_text()):
            for sample in family.samples:
                if sample.name == "celery_task_succeeded_total":
                    key = (sample.labels["queue"], sample.labels["task"])
                    counts[key] = counts.get(key, 0) + sample.value
    return counts


def test_djangoshop_runs_its_own_tasks_on_its_routed_queues(tmp_path, run_dir):
    project = _project("djangoshop", tmp_path)
    report = _run(project, run_dir, "--app", "djangoshop.celery:app", "--tasks", "tasks.yml")
    by_task = {name: row["count"] for name, row in report["latency_ms_extra"]["end_to_end_by_task"].items()}
    assert set(by_task) == {"orders.tasks.place_order", "emails.tasks.send_confirmation",
                            "billing.tasks.charge_invoice", "reports.tasks.daily_sales"}  # its own reports app's too
    assert all(count > 0 for count in by_task.values()), by_task
    assert report["tasks"]["succeeded"] == report["tasks"]["submitted"]
    # CELERY_TASK_ROUTES: every charge went through the billing queue, every mail through emails, and the workers
    # consumed both (the task mix names no queue)
    finished = _succeeded_by_queue_and_task(run_dir)
    assert finished[("billing", "billing.tasks.charge_invoice")] == by_task["billing.tasks.charge_invoice"]
    assert finished[("emails", "emails.tasks.send_confirmation")] == by_task["emails.tasks.send_confirmation"]
    assert finished[("default", "orders.tasks.place_order")] == by_task["orders.tasks.place_order"]
    # the project's broker URL (Django settings, CELERY_ namespace) was replaced by the run's
    assert report["app_config"]["replaced"]["broker_url"]["app"] == "redis://localhost:6379/0"
    assert (run_dir / "report.html").is_file()


def _assert_retries_and_chains(report, run_dir) -> dict:
    by_task = {name: row["count"] for name, row in report["latency_ms_extra"]["end_to_end_by_task"].items()}
    assert by_task.get("orders_api.tasks.checkout", 0) > 0 and by_task.get("orders_api.tasks.charge_payment", 0) > 0
    retries = report["retries"]
    # the gateway is busy for an order's first order_id % 3 calls: retried once and twice, never exhausted
    assert retries["exceptions"]["GatewayBusy"] == report["tasks"]["retried"] > 0
    assert retries["attempts"].get("2", 0) > 0 and retries["attempts"].get("3", 0) > 0, retries["attempts"]
    assert retries["exhausted"] == 0 and report["tasks"]["failed"] == 0
    assert retries["backoff_observed_s"]["max"] > 0
    # the policy reported is the app's own task's (max_retries 5, backoff 1 s up to 4 s), not the reference flaky's
    charge = {"max_retries": 5, "backoff_factor_s": 1, "backoff_max_s": 4, "jitter": True, "delay_s": None}
    assert retries["policies"] == {"orders_api.tasks.charge_payment": charge} and retries["policy"] == charge
    # every checkout's chain ran to its last step (counted by the workers, whatever the ledger makes of children)
    finished = _succeeded_by_queue_and_task(run_dir)
    assert finished[("celery", "orders_api.tasks.send_receipt")] == finished[("celery", "orders_api.tasks.checkout")] \
        == by_task["orders_api.tasks.checkout"]
    return by_task


def test_fastapi_orders_task_mix_counts_retries_and_runs_its_chains(tmp_path, run_dir):
    project = _project("fastapi_orders", tmp_path)
    # the service's container environment, which Celery reads before any configuration: the run still uses its own
    service_env = {"CELERY_BROKER_URL": "redis://127.0.0.1:1/0", "CELERY_RESULT_BACKEND": "redis://127.0.0.1:1/1"}
    report = _run(project, run_dir, "--app", "orders_api.celery:app", "--tasks", "tasks.yml", env=service_env)
    _assert_retries_and_chains(report, run_dir)
    replaced = report["app_config"]["replaced"]
    assert replaced["broker_url"]["app"] == service_env["CELERY_BROKER_URL"]
    assert replaced["result_backend"]["app"] == service_env["CELERY_RESULT_BACKEND"]


def test_fastapi_orders_locustfile_on_the_public_api(tmp_path, run_dir):
    project = _project("fastapi_orders", tmp_path)
    report = _run(project, run_dir, "--app", "orders_api.celery:app", "--locustfile", "locustfile.py")
    by_task = _assert_retries_and_chains(report, run_dir)
    requests = {row["name"]: row for row in report["locust"]["by_request"]}
    for name in ("orders_api.tasks.checkout", "orders_api.tasks.charge_payment", "orders_api.tasks.reserve_stock"):
        published = requests[f"publish {name}"]
        assert published["requests"] > 0 and published["failures"] == 0, published
        # the ledger counts at least what the users published (a chain's steps come on top)
        assert by_task[name] >= published["requests"] and requests[f"end_to_end {name}"]["requests"] > 0
    assert report["locust"]["request_failures"] == 0


def test_fastapi_orders_http_api_runs_an_orders_workflow(tmp_path, monkeypatch):
    """The service's own HTTP side, against workers of its app on a loadlab stack: an order posted to the FastAPI app
    runs its chain to the receipt."""
    project = _project("fastapi_orders", tmp_path)
    monkeypatch.chdir(project)  # the stack's workers import the app from the project's directory, as a user's would
    settings = Settings.build(run_id=unique(), app="orders_api.celery:app", metrics="off")
    with Stack(settings, tmp_path / "stack", api=False) as stack:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOADLAB_") and k != "PYTHONPATH"}
        env.update(CELERY_BROKER_URL=stack.settings.broker, CELERY_RESULT_BACKEND=stack.settings.backend)
        api = subprocess.Popen([sys.executable, "-m", "uvicorn", "orders_api.main:api", "--port", str(port),
                                "--log-level", "warning"], cwd=project, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        try:
            base = f"http://127.0.0.1:{port}"

            def up():
                try:
                    return httpx.get(f"{base}/docs", timeout=1).status_code == 200
                except httpx.HTTPError:
                    assert api.poll() is None, api.stdout.read()
                    return False

            wait_until(up, 30, what="the orders API to answer")
            placed = httpx.post(f"{base}/orders", json={"order_id": 5, "items": 2}, timeout=10)
            assert placed.status_code == 202, placed.text
            status_url = base + placed.json()["status_url"]
            # order 5 meets a busy gateway twice (5 % 3): the charge is retried with backoff before the receipt
            done = wait_until(lambda: (r := httpx.get(status_url, timeout=5).json())["state"] == "SUCCESS" and r,
                              60, interval=0.2, what="the order's workflow to finish")
            assert done["receipt"] == "receipt for order 5: 25.00 EUR"
            refused = httpx.post(f"{base}/orders", json={"order_id": 0}, timeout=10)
            assert refused.status_code == 422  # FastAPI's validation of the order
        finally:
            api.terminate()
            api.wait(timeout=15)
