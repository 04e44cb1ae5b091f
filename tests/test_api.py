"""The producer API against a real embedded stack: the 202 path and every client-mistake status."""
import time

import httpx
import pytest

from loadlab.config.settings import Settings
from loadlab.stack.supervisor import Stack
from tests.conftest import unique, wait_until


@pytest.fixture(scope="module")
def api_stack(tmp_path_factory):
    settings = Settings.build(run_id=unique(), api_max_body_bytes="4096")
    with Stack(settings, tmp_path_factory.mktemp("api")) as stack:
        yield stack


@pytest.fixture
def client(api_stack):
    with httpx.Client(base_url=api_stack.settings.api_url, timeout=10) as c:
        yield c


def _finished(client, status_url):
    body = client.get(status_url).json()
    return body if body["state"] in ("SUCCESS", "FAILURE") else None


def test_submit_returns_202_and_the_status_url_reports_the_result(client):
    response = client.post("/tasks/io", json={"ms": 5})
    assert response.status_code == 202
    body = response.json()
    assert body["task"] == "io" and body["status_url"] == f"/tasks/{body['id']}"
    done = wait_until(lambda: _finished(client, body["status_url"]), 30, what="the task to finish")
    assert done["state"] == "SUCCESS" and done["result"] == 5 and done["worker"] and done["date_done"]


def test_unknown_task_is_404_with_a_json_error(client):
    response = client.post("/tasks/rm-rf", json={})
    assert response.status_code == 404
    assert "rm-rf" in response.json()["error"] and "noop" in response.json()["error"]


@pytest.mark.parametrize("body", [
    b'{"ms": -1}', b'{"ms": "fast"}', b'{"ms": 1e999}', b'{"ms": 123456789012345678901234567890}',
    b'{"unknown_field": 1}', b"[1, 2]", b'"just a string"',
])
def test_bad_arguments_are_422(client, body):
    response = client.post("/tasks/cpu", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe{}", b"[" * 5000 + b"]" * 5000])
def test_malformed_bodies_are_422_not_500(client, raw):
    response = client.post("/tasks/noop", content=raw, headers={"content-type": "application/json"})
    assert response.status_code in (413, 422), response.text
    assert response.json()["error"]


def test_body_over_the_limit_is_413(client):
    response = client.post("/tasks/payload", json={"size_bytes": 10, "shape": "large_text", "pad": "x" * 5000})
    assert response.status_code == 413
    assert "4096" in response.json()["error"]


def test_status_of_a_non_uuid_is_422(client):
    assert client.get("/tasks/not-a-uuid").status_code == 422


def test_openapi_and_healthz(client):
    from loadlab.stack.tasks import TASK_ARGS

    spec = client.get("/openapi.json").json()
    assert {f"/tasks/{name}" for name in TASK_ARGS} | {"/tasks/{task_id}", "/healthz"} == set(spec["paths"])
    submit_cpu = spec["paths"]["/tasks/cpu"]["post"]
    assert submit_cpu["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/CpuArgs"}
    assert spec["components"]["schemas"]["CpuArgs"]["additionalProperties"] is False
    assert submit_cpu["responses"]["422"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert client.get("/healthz").json() == {"status": "ok", "broker": "ok", "backend": "ok"}


def test_broker_down_is_a_quick_503(tmp_path):
    settings = Settings.build(run_id=unique())
    with Stack(settings, tmp_path) as stack:
        with httpx.Client(base_url=stack.settings.api_url, timeout=30) as c:
            assert c.post("/tasks/noop").status_code == 202
            stack.redis.stop()
            started = time.monotonic()
            response = c.post("/tasks/noop")
            elapsed = time.monotonic() - started
            assert response.status_code == 503, response.text
            assert "broker" in response.json()["error"]
            assert elapsed < 10
            assert c.get("/healthz").status_code == 503
