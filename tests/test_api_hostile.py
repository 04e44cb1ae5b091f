"""Hand-written hostile requests against the producer API of a real embedded stack: oversized and chunked bodies,
deep nesting, invalid UTF-8, huge numbers, unknown fields, wrong content types, NUL bytes and very long names.
Each must get a 4xx with a bounded JSON error (or the HTTP server's own 400 for a request that is not HTTP), never a
5xx, and the API process must keep serving afterwards. (tests/test_api.py has the everyday client mistakes.)"""
from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from loadlab.config.settings import Settings
from loadlab.stack.supervisor import Stack
from tests.conftest import unique, wait_until

LIMIT = 1_048_576  # the default --api-max-body-bytes
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def hostile_stack(tmp_path_factory):
    settings = Settings.build(run_id=unique("hostile"), workers="1", concurrency="4")
    with Stack(settings, tmp_path_factory.mktemp("hostile")) as stack:
        yield stack
        for worker in stack.workers:  # the longest valid tasks below would hold up a warm shutdown
            worker.kill()


@pytest.fixture
def client(hostile_stack):
    with httpx.Client(base_url=hostile_stack.settings.api_url, timeout=30) as c:
        yield c
    # whatever the test sent, the API process is alive and answers
    assert hostile_stack.api.running(), hostile_stack.api.log_tail()
    assert httpx.get(f"{hostile_stack.settings.api_url}/healthz", timeout=10).status_code == 200


def _error_of(response: httpx.Response, *statuses: int) -> str:
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert isinstance(error, str) and 10 < len(error) < 600, error
    return error


def _raw(api_url: str, request: bytes, timeout: float = 15) -> bytes:
    """Send bytes as they are (no client library fixing them up); return what came back until the server closed
    (a server may also drop a request it will not read: then what it sent before, possibly nothing)."""
    parts = urlsplit(api_url)
    received = b""
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # reset, broken pipe, or not connected any more: the server already answered and closed
            pass
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received


def _status(raw_response: bytes) -> int:
    return int(raw_response.split(b" ", 2)[1])


# --- oversized bodies ----------------------------------------------------------------------------------------------
def test_declared_length_over_the_limit_is_413_before_the_body_is_read(hostile_stack):
    head = (b"POST /tasks/noop HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000000\r\nConnection: close\r\n\r\n{")
    started = time.monotonic()
    response = _raw(hostile_stack.settings.api_url, head)
    assert _status(response) == 413, response[:300]
    assert b"1000000000000 bytes" in response and str(LIMIT).encode() in response
    assert time.monotonic() - started < 10


def test_chunked_body_over_the_limit_is_413(client):
    sent = []

    def chunks():
        for _ in range(40):  # 40 × 64 KiB = 2.5 MiB, no Content-Length
            sent.append(1)
            yield b" " * 65536

    response = client.post("/tasks/noop", content=chunks(), headers=JSON)
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert str(LIMIT) in _error_of(response, 413)


def test_chunked_body_under_the_limit_is_read(client):
    response = client.post("/tasks/cpu", content=iter([b'{"ms"', b": 1", b"}"]), headers=JSON)
    assert response.status_code == 202, response.text


def test_body_just_over_the_limit_without_chunking_is_413(client):
    body = b'{"ms": 1, "pad": "' + b"x" * LIMIT + b'"}'
    assert str(LIMIT) in _error_of(client.post("/tasks/cpu", content=body, headers=JSON), 413)


def test_malformed_content_length_is_refused_by_the_http_server(hostile_stack):
    response = _raw(hostile_stack.settings.api_url, b"POST /tasks/noop HTTP/1.1\r\nHost: x\r\n"
                                                    b"Content-Length: 12abc\r\nConnection: close\r\n\r\n{}")
    assert _status(response) == 400, response[:300]


# --- deep nesting --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    b'{"ms": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"ms": ' + b"[" * 900 + b"]" * 900 + b"}",  # deep but parseable: refused by argument validation
])
def test_deep_nesting_is_422_and_the_api_survives(client, body):
    assert len(body) < LIMIT
    error = _error_of(client.post("/tasks/cpu", content=body, headers=JSON), 422)
    assert "Internal" not in error


def test_many_deep_bodies_in_a_row_do_not_wear_the_api_down(client):
    body = b"[" * 100_000 + b"]" * 100_000
    for _ in range(20):
        assert client.post("/tasks/noop", content=body, headers=JSON).status_code == 422
    assert client.post("/tasks/noop").status_code == 202


# --- invalid UTF-8 and odd strings ---------------------------------------------------------------------------------
@pytest.mark.parametrize("body", [
    b'{"shape": "\xff"}', b'{"shape": "\xc0\xaf"}', b'{"\xed\xa0\x80": 1}', b"\xef\xbb\xbf{}",
    b'{"shape": "flat_strings\x00"}', b'{"shape": "flat\\u0000strings"}',
])
def test_invalid_utf8_and_odd_strings_are_422(client, body):
    assert "Internal" not in _error_of(client.post("/tasks/payload", content=body, headers=JSON), 422)


@pytest.mark.parametrize("body", [b'{"\\ud800": 1}', b'{"shape": "\\udfff"}', b'{"\\udbff\\udfff\\ud800x": 1}'])
def test_lone_surrogates_are_422_with_an_encodable_error(client, body):
    assert "Internal" not in _error_of(client.post("/tasks/payload", content=body, headers=JSON), 422)


# --- numbers -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, body, words", [
    ("/tasks/cpu", b'{"ms": 1e400}', ["ms", "60000"]),
    ("/tasks/cpu", b'{"ms": -1e400}', ["ms", "0"]),
    ("/tasks/payload", b'{"size_bytes": 1e400}', ["size_bytes"]),
    ("/tasks/payload", b'{"size_bytes": 1e20}', ["size_bytes"]),
    ("/tasks/payload", b'{"size_bytes": ' + b"9" * 5000 + b"}", ["too many digits"]),
    ("/tasks/payload", b'{"size_bytes": -' + b"9" * 5000 + b"}", ["too many digits"]),
    ("/tasks/payload", b'{"size_bytes": 1.5}', ["size_bytes", "integer"]),
    ("/tasks/flaky", b'{"p": NaN}', ["NaN"]),
    ("/tasks/flaky", b'{"p": Infinity}', ["Infinity"]),
    ("/tasks/flaky", b'{"p": -Infinity}', ["Infinity"]),
    ("/tasks/cpu", b'{"ms": "5"}', ["ms", "number"]),
    ("/tasks/cpu", b'{"ms": true}', ["ms", "number"]),
    ("/tasks/payload", b'{"size_bytes": "10"}', ["size_bytes", "integer"]),
])
def test_huge_odd_and_mistyped_numbers_are_422(client, path, body, words):
    error = _error_of(client.post(path, content=body, headers=JSON), 422)
    for word in words:
        assert word in error, error


@pytest.mark.parametrize("path, body", [
    ("/tasks/cpu", b'{"ms": 1e-400}'),            # underflows to 0: a valid value
    ("/tasks/payload", b'{"size_bytes": 1024.0}'),  # JSON Schema counts 1024.0 as an integer
    ("/tasks/io", b'{"ms": 60000}'),               # the largest valid values (the fuzzer folds them to small ones)
    ("/tasks/cpu", b'{"ms": 60000.0}'),
    ("/tasks/flaky", b'{"p": 1}'),
])
def test_edge_numbers_that_are_valid_are_accepted(client, path, body):
    assert client.post(path, content=body, headers=JSON).status_code == 202


def test_the_largest_payload_is_accepted_without_stalling_the_api(client):
    response = client.post("/tasks/payload", json={"size_bytes": 8 * 1024 * 1024, "shape": "nested_dicts"},
                           timeout=60)
    assert response.status_code == 202, response.text


# --- unknown fields ------------------------------------------------------------------------------------------------
def test_unknown_fields_are_named(client):
    error = _error_of(client.post("/tasks/cpu", json={"ms": 1, "msec": 2}), 422)
    assert "msec" in error


def test_a_huge_unknown_field_name_gives_a_bounded_error(client):
    error = _error_of(client.post("/tasks/noop", json={"k" * 500_000: 1}), 422)
    assert "kkkk" in error  # _error_of bounds its length


def test_many_unknown_fields_give_a_bounded_error(client):
    error = _error_of(client.post("/tasks/noop", json={f"f{i}": i for i in range(20_000)}), 422)
    assert "f0" in error and "and 19995 more" in error


@pytest.mark.parametrize("body", [b"null", b"true", b"5", b"-0.0", b'"x"', b"[]", b"[{}]", b"\t", b" \r\n "])
def test_json_that_is_not_an_object_is_422(client, body):
    # whitespace alone (found by the fuzzer: it was taken for "no body") is not a JSON document
    assert "JSON object" in _error_of(client.post("/tasks/noop", content=body, headers=JSON), 422)


# --- content types -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content_type", [
    "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml",
    "application/json; charset=latin-1", "application/jsonp", "", "application/json\x7f",
])
def test_a_body_with_a_non_json_content_type_is_415(client, content_type):
    error = _error_of(client.post("/tasks/cpu", content=b'{"ms": 1}', headers={"content-type": content_type}), 415)
    assert "application/json" in error


@pytest.mark.parametrize("headers", [
    {"content-type": "application/json; charset=utf-8"}, {"content-type": "Application/JSON"},
    {"content-type": "application/vnd.loadlab+json"}, {},
])
def test_json_content_types_and_a_missing_one_are_accepted(client, headers):
    response = client.post("/tasks/cpu", content=b'{"ms": 1}', headers=headers)
    assert response.status_code == 202, response.text


def test_an_empty_body_of_any_type_means_defaults(client):
    assert client.post("/tasks/cpu", content=b"", headers={"content-type": "text/plain"}).status_code == 202


# --- paths: NUL bytes, long names and ids, methods -----------------------------------------------------------------
@pytest.mark.parametrize("method, path, status", [
    ("POST", "/tasks/%00", 404), ("POST", "/tasks/noop%00", 404), ("GET", "/tasks/%00", 422),
    ("GET", "/tasks/00000000-0000-0000-0000-000000000000%00", 422), ("POST", "/tasks/%FF%FE", 404),
    ("GET", "/tasks/%ED%A0%80", 422), ("POST", "/tasks/..%2F..%2Fetc%2Fpasswd", 404),
])
def test_nul_and_odd_bytes_in_the_path_are_4xx(client, method, path, status):
    _error_of(client.request(method, path), status)


def test_a_raw_nul_byte_in_the_request_line_is_refused_by_the_http_server(hostile_stack):
    response = _raw(hostile_stack.settings.api_url, b"POST /tasks/no\x00op HTTP/1.1\r\nHost: x\r\n"
                                                    b"Connection: close\r\n\r\n")
    assert 400 <= _status(response) < 500, response[:300]


@pytest.mark.parametrize("length", [300, 10_000, 60_000])
def test_very_long_task_names_and_ids_are_4xx_with_a_bounded_error(client, length):
    _error_of(client.post("/tasks/" + "n" * length), 404)
    _error_of(client.get("/tasks/" + "i" * length), 422)


def test_an_enormous_request_line_is_refused_without_a_5xx(hostile_stack):
    response = _raw(hostile_stack.settings.api_url, b"GET /tasks/" + b"x" * 1_000_000 + b" HTTP/1.1\r\nHost: x\r\n"
                                                    b"Connection: close\r\n\r\n")
    assert not response or 400 <= _status(response) < 500, response[:300]
    assert hostile_stack.api.running()
    assert httpx.get(f"{hostile_stack.settings.api_url}/healthz", timeout=10).status_code == 200


@pytest.mark.parametrize("method, path, allow", [
    ("PUT", "/tasks/cpu", "POST"), ("DELETE", "/tasks/noop", "POST"), ("GET", "/tasks/payload", "POST"),
    ("POST", "/tasks/3f2b8c1e-9d4a-4e6b-8f7a-2c1d0e9b8a76", "GET, HEAD"),
    ("PATCH", "/tasks/3f2b8c1e-9d4a-4e6b-8f7a-2c1d0e9b8a76", "GET, HEAD"),
    ("DELETE", "/healthz", "GET"),
])
def test_wrong_methods_are_405_with_allow(client, method, path, allow):
    response = client.request(method, path)
    _error_of(response, 405)
    assert set(response.headers["allow"].replace(" ", "").split(",")) >= set(allow.replace(" ", "").split(","))


def test_slow_clients_do_not_block_others(hostile_stack, client):
    """A client that sends half a body and stalls holds its own connection, not the API."""
    parts = urlsplit(hostile_stack.settings.api_url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(b"POST /tasks/noop HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        started = time.monotonic()
        assert client.get("/healthz").status_code == 200
        assert client.post("/tasks/noop").status_code == 202
        assert time.monotonic() - started < 10


def test_a_submitted_task_with_hostile_but_valid_input_still_runs(client):
    response = client.post("/tasks/cpu", content=b'{"ms": 1e-400}', headers=JSON)
    status_url = response.json()["status_url"]
    body = wait_until(lambda: (b := client.get(status_url).json())["state"] in ("SUCCESS", "FAILURE") and b,
                      60, what="the task to finish")
    assert body["state"] == "SUCCESS"
