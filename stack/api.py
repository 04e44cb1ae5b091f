"""The producer API: submits reference tasks over HTTP. Client mistakes get a 4xx with a JSON error, a missing
broker a quick 503, never a 5xx for something the client did.

One route, ``POST /tasks/{name}``, serves every task (so metrics and spans carry one bounded handler label), but the
OpenAPI document describes each task as an operation of its own, ``POST /tasks/noop``, ``POST /tasks/cpu``, …, with
the JSON schema of that task's arguments as its request body: clients, ``/docs`` and fuzzers see exactly what each
task accepts. Every documented status has a documented body (``Error`` for errors)."""
from __future__ import annotations

import json
import re
import uuid
from typing import Annotated

from fastapi import Body, FastAPI, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from loadlab.config.settings import Settings
from loadlab.exporters import api_metrics, tracing
from loadlab.stack.app import make_app
from loadlab.stack.tasks import TASK_ARGS, full_name

TASK_ID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
_TASK_ID_RE = re.compile(TASK_ID_PATTERN)
_JSON_MEDIA_RE = re.compile(r"^application/(?:[\w.+-]+\+)?json$")
SHOWN_CHARS = 64  # client-supplied names and keys are cut to this in error messages
# Methods the task paths answer with 405 (and an Allow header) rather than Starlette's default.
_OTHER_METHODS = ["PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"]

TASK_SUMMARIES = {
    "noop": "does nothing: measures the pipeline's own overhead",
    "cpu": "burns `ms` milliseconds of CPU time",
    "io": "sleeps `ms` milliseconds",
    "flaky": "fails with probability `p` and is retried with the backoff policy of the settings",
    "payload": "takes and returns a body of `size_bytes` bytes (as JSON) of the chosen `shape`",
}


class Submitted(BaseModel):
    id: str = Field(description="Task id (a UUID)")
    task: str = Field(description="Short name of the task")
    status_url: str = Field(description="Path of the task's status: GET it")


class TaskStatus(BaseModel):
    id: str
    state: str = Field(description="PENDING (unknown or not started), STARTED, RETRY, SUCCESS, FAILURE or REVOKED")
    result: object | None = None
    retries: int | None = None
    worker: str | None = None
    date_done: str | None = None


class Health(BaseModel):
    status: str = Field(description="ok, or degraded when the broker or the backend does not answer")
    broker: str
    backend: str


class Error(BaseModel):
    error: str = Field(description="One sentence: what was wrong with the request and what is accepted")


def _err(description: str) -> dict:
    return {"model": Error, "description": description}


SUBMIT_RESPONSES = {
    202: {"description": "Queued; `status_url` reports its state",
          "links": {"status": {"operationId": "task_status", "parameters": {"task_id": "$response.body#/id"},
                               "description": "The state of the submitted task"}}},
    400: _err("Malformed request (a Content-Length that is not a number)"),
    413: _err("Body over the limit (--api-max-body-bytes)"),
    415: _err("Body that is not JSON (send Content-Type: application/json)"),
    422: _err("Body that is not a JSON object of the task's arguments, or invalid arguments"),
    503: _err("Broker unavailable"),
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        self.status, self.message, self.headers = status, message, headers


def _shown(text: str) -> str:
    """A client-supplied string as it may appear in an error: repr, cut to a bounded length."""
    return repr(text[:SHOWN_CHARS]) + ("…" if len(text) > SHOWN_CHARS else "")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # lone surrogates (from \ud800 escapes in a body) cannot be encoded as UTF-8: escape them instead of failing
    safe = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": safe}, status_code=status, headers=headers)


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _loc(loc) -> str:
    return ".".join(str(p)[:SHOWN_CHARS] for p in loc) or "body"


def _clauses(errors: list[dict], shown: int = 5) -> str:
    """pydantic errors as '<field>: <problem>' clauses, at most ``shown`` of them."""
    text = "; ".join(f"{_loc(e['loc'])}: {e['msg']}" for e in errors[:shown])
    return text + (f"; and {len(errors) - shown} more" if len(errors) > shown else "")


def _integral_floats_as_ints(model: type[BaseModel], data: dict) -> dict:
    """JSON Schema counts 1024.0 as an integer; strict validation would not, so convert those for integer fields."""
    out = dict(data)
    for key, value in data.items():
        field = model.model_fields.get(key)
        if (field is not None and field.annotation is int and isinstance(value, float) and value.is_integer()
                and abs(value) < 2 ** 63):
            out[key] = int(value)
    return out


def parse_json_body(raw: bytes):
    """Strict JSON (RFC 8259: UTF-8, no NaN/Infinity) with one-sentence errors; never a RecursionError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(422, f"The body is not valid UTF-8 (byte {exc.start}); send a JSON object of the task's "
                            "arguments.") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(422, "The body nests too deeply to parse; send a flat JSON object of the task's "
                            "arguments.") from None
    except json.JSONDecodeError as exc:
        raise ApiError(422, f"The body is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                            "send a JSON object of the task's arguments.") from None
    except ValueError as exc:  # NaN/Infinity, or an integer past Python's digit limit
        reason = "a number with too many digits" if "digits" in str(exc) else str(exc)
        raise ApiError(422, f"The body is not valid JSON ({reason}); send a JSON object of the task's "
                            "arguments.") from None


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    celery_app = make_app(settings, role="api")
    api = FastAPI(title="loadlab producer API", version="1",
                  description="Submits loadlab's reference Celery tasks and reports their state. Errors are "
                              "`{\"error\": \"<one sentence>\"}`.")
    limit = settings.api_max_body_bytes
    api_metrics.instrument_api(api, settings)
    tracing.instrument_api(api, settings)

    @api.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return _error(exc.status, exc.message, exc.headers)

    @api.exception_handler(RequestValidationError)
    async def _validation(_request, exc: RequestValidationError):
        return _error(422, f"The request is invalid: {_clauses(exc.errors())}.")

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        headers = getattr(exc, "headers", None)
        message = str(exc.detail)
        if exc.status_code == 404:
            message = (f"There is nothing at {_shown(request.url.path)}; the API serves POST /tasks/<task name>, "
                       "GET /tasks/<task id>, GET /healthz and its OpenAPI at /openapi.json.")
        elif exc.status_code == 405 and headers and "Allow" in headers:
            message = f"{request.method[:16]} is not allowed here; use {headers['Allow']}."
        return _error(exc.status_code, message, headers)

    @api.exception_handler(Exception)
    async def _unexpected(_request, exc: Exception):
        return _error(500, f"Internal error: {type(exc).__name__}.")

    def check_json_content_type(request: Request) -> None:
        declared = request.headers.get("content-type")
        if declared is None:
            return  # bare bodies are read as JSON
        media, _, params = declared.partition(";")
        charset = re.search(r"charset\s*=\s*\"?([\w-]+)", params, re.IGNORECASE)
        if not _JSON_MEDIA_RE.match(media.strip().lower()) or (
                charset and charset.group(1).lower() not in ("utf-8", "utf8")):
            raise ApiError(415, f"Content-Type {_shown(declared)} is not accepted; send the arguments as "
                                "application/json (UTF-8).")

    async def read_json_object(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, f"Content-Length {_shown(declared)} is not a number of bytes.")
            if int(declared) > limit:
                raise ApiError(413, f"The body is {int(declared)} bytes; the limit is {limit} bytes.")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"The body is over the limit of {limit} bytes.")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw:  # no body: all defaults (whitespace alone is malformed JSON, refused below)
            return {}
        check_json_content_type(request)
        data = parse_json_body(raw)
        if not isinstance(data, dict):
            kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(data), "a number")
            raise ApiError(422, f"The body is {kind}; send a JSON object of the task's arguments.")
        return data

    def not_here(path_part: str, method: str) -> ApiError:
        """405 (with Allow) for a known resource and a wrong method, 404 for anything else under /tasks/."""
        if path_part in TASK_ARGS:
            return ApiError(405, f"{method} is not allowed on /tasks/{path_part}; POST to it submits the task.",
                            {"Allow": "POST"})
        if _TASK_ID_RE.match(path_part):
            return ApiError(405, f"{method} is not allowed on a task id; GET /tasks/<id> reports its state.",
                            {"Allow": "GET, HEAD"})
        return ApiError(404, f"Task {_shown(path_part)} is not known; use one of {', '.join(TASK_ARGS)}.")

    @api.post("/tasks/{name}", status_code=202, response_model=Submitted, include_in_schema=False)
    async def submit(name: str, request: Request) -> Submitted:
        """Submit a reference task; the JSON body holds its arguments (documented per task in the OpenAPI)."""
        model = TASK_ARGS.get(name)
        if model is None:
            raise not_here(name, "POST")
        data = await read_json_object(request)
        try:
            args = model.model_validate(_integral_floats_as_ints(model, data), strict=True)  # "5", true: no numbers
        except ValidationError as exc:
            raise ApiError(422, f"Invalid arguments for {name}: {_clauses(exc.errors())}.") from None
        task_id = str(uuid.uuid4())

        def build_and_send():
            # In a thread: a payload body of megabytes takes a second or two to build; the event loop stays free.
            # kwargsrepr: the arguments as posted; Celery's own repr of a megabyte body would take seconds more.
            celery_app.send_task(full_name(name), kwargs=args.call_kwargs(), task_id=task_id, retry=False,
                                 kwargsrepr=repr(args.model_dump()))

        try:
            await run_in_threadpool(build_and_send)
        except Exception as exc:  # noqa: BLE001 - kombu raises several types when the broker is unreachable
            raise ApiError(503, f"The broker is unavailable ({type(exc).__name__}); try again later.") from None
        return Submitted(id=task_id, task=name, status_url=f"/tasks/{task_id}")

    @api.api_route("/tasks/{name}", methods=_OTHER_METHODS, include_in_schema=False)
    async def other_methods(name: str, request: Request):
        raise not_here(name, request.method)

    @api.get("/tasks/{task_id}", response_model=TaskStatus, operation_id="task_status", responses={
        405: _err("The path names a task, not a task id: POST to it to submit the task"),
        422: _err("Not a task id"), 503: _err("Result backend unavailable")})
    def status(task_id: Annotated[str, Path(description="Task id as returned by a submit (a UUID)",
                                            json_schema_extra={"pattern": TASK_ID_PATTERN, "format": "uuid"})],
               request: Request) -> TaskStatus:
        """State of a task; ``result``, ``retries``, ``worker`` and ``date_done`` once it has finished."""
        if task_id in TASK_ARGS:
            raise not_here(task_id, request.method)
        if not _TASK_ID_RE.match(task_id):
            raise ApiError(422, f"{_shown(task_id)} is not a task id; task ids are UUIDs such as "
                                "'3f2b8c1e-9d4a-4e6b-8f7a-2c1d0e9b8a76'.")
        try:
            # The backend's own read, not an AsyncResult: under Celery 5.5 an AsyncResult collected while another
            # one unsubscribes (its __del__ unsubscribes too) deadlocks on the Redis backend's pubsub connection.
            meta = celery_app.backend.get_task_meta(task_id)
            state = meta["status"]
            if state in ("SUCCESS", "FAILURE", "RETRY", "REVOKED"):
                date_done = meta.get("date_done")
                return TaskStatus(id=task_id, state=state, result=_jsonable(meta.get("result")),
                                  retries=meta.get("retries"), worker=meta.get("worker"),
                                  date_done=date_done.isoformat() if hasattr(date_done, "isoformat") else date_done)
        except Exception as exc:  # noqa: BLE001
            raise ApiError(503, f"The result backend is unavailable ({type(exc).__name__}).") from None
        return TaskStatus(id=task_id, state=state)

    @api.get("/healthz", response_model=Health, operation_id="health",
             responses={503: {"model": Health, "description": "Broker or backend unreachable"}})
    def healthz():
        """Whether the broker and the result backend answer."""
        broker = backend = "ok"
        try:
            with celery_app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
        except Exception as exc:  # noqa: BLE001
            broker = f"unreachable: {type(exc).__name__}"
        try:
            _ping_backend(celery_app.backend)
        except Exception as exc:  # noqa: BLE001
            backend = f"unreachable: {type(exc).__name__}"
        ok = broker == backend == "ok"
        body = Health(status="ok" if ok else "degraded", broker=broker, backend=backend)
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    def openapi() -> dict:
        if api.openapi_schema is None:
            api.openapi_schema = get_openapi(title=api.title, version=api.version, description=api.description,
                                             routes=[*_task_doc_routes(), *api.routes])
        return api.openapi_schema

    api.openapi = openapi
    return api


def _task_doc_routes() -> list[APIRoute]:
    """One documented ``POST /tasks/<name>`` per task, used only to write the OpenAPI (the real route is
    ``/tasks/{name}``): the request body is the task's argument model, optional (an empty body means defaults)."""
    routes = []
    for name, model in TASK_ARGS.items():
        async def endpoint(args=None):  # never called: the route only describes the operation
            raise NotImplementedError

        endpoint.__annotations__ = {"args": Annotated[model, Body()], "return": Submitted}
        fields = ", ".join(f"`{f}`" for f in model.model_fields) or "none"
        routes.append(APIRoute(
            f"/tasks/{name}", endpoint, methods=["POST"], status_code=202, response_model=Submitted,
            responses=SUBMIT_RESPONSES, operation_id=f"submit_{name}", summary=f"Submit a {name} task",
            description=f"Queues `{name}`, which {TASK_SUMMARIES.get(name, 'is a reference task')}. The body is a "
                        f"JSON object of its arguments ({fields}); fields left out take their defaults, and an empty "
                        "body means all defaults. Unknown fields are refused."))
    return routes


def _ping_backend(backend) -> None:
    client = getattr(backend, "client", None)
    if client is not None and hasattr(client, "ping"):
        client.ping()
        return
    if hasattr(backend, "ResultSession"):
        from sqlalchemy import text

        with backend.ResultSession() as session:
            session.execute(text("SELECT 1"))
