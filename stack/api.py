"""The producer API: submits reference tasks over HTTP. Client mistakes get a 4xx with a JSON error, a missing
broker a quick 503, never a 5xx for something the client did."""
from __future__ import annotations

import json
import uuid

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from exporters import api_metrics, tracing
from stack.app import make_app
from stack.settings import Settings
from stack.tasks import TASK_ARGS, full_name


class Submitted(BaseModel):
    id: str
    task: str
    status_url: str


class TaskStatus(BaseModel):
    id: str
    state: str
    result: object | None = None
    retries: int | None = None
    worker: str | None = None
    date_done: str | None = None


class Health(BaseModel):
    status: str
    broker: str
    backend: str


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    celery_app = make_app(settings, role="api")
    api = FastAPI(title="loadlab producer API", version="1",
                  description="Submits loadlab's reference Celery tasks and reports their state.")
    limit = settings.api_max_body_bytes
    api_metrics.instrument_api(api, settings)
    tracing.instrument_api(api, settings)

    @api.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return _error(exc.status, exc.message)

    @api.exception_handler(RequestValidationError)
    async def _validation(_request, exc: RequestValidationError):
        return _error(422, "The request is invalid: " + "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()) + ".")

    @api.exception_handler(StarletteHTTPException)
    async def _http(_request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @api.exception_handler(Exception)
    async def _unexpected(_request, exc: Exception):
        return _error(500, f"Internal error: {type(exc).__name__}.")

    async def read_json_object(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, f"Content-Length {declared!r} is not a number of bytes.")
            if int(declared) > limit:
                raise ApiError(413, f"The body is {int(declared)} bytes; the limit is {limit} bytes.")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"The body is over the limit of {limit} bytes.")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiError(422, "The body is not valid UTF-8; send a JSON object.") from None
        except (ValueError, RecursionError):
            raise ApiError(422, "The body is not valid JSON; send a JSON object of the task's arguments.") from None
        if not isinstance(data, dict):
            raise ApiError(422, f"The body is a JSON {type(data).__name__}; send a JSON object of the task's arguments.")
        return data

    @api.post("/tasks/{name}", status_code=202, response_model=Submitted,
              responses={404: {"description": "Unknown task"}, 413: {"description": "Body too large"},
                         422: {"description": "Invalid arguments"}, 503: {"description": "Broker unavailable"}})
    async def submit(name: str, request: Request) -> Submitted:
        """Submit a reference task; the JSON body holds its arguments (see each task's schema)."""
        model = TASK_ARGS.get(name)
        if model is None:
            raise ApiError(404, f"Task {name!r} is not known; use one of {', '.join(TASK_ARGS)}.")
        data = await read_json_object(request)
        try:
            kwargs = model.model_validate(data).call_kwargs()
        except ValidationError as exc:
            raise ApiError(422, f"Invalid arguments for {name}: " + "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()) + ".") from None
        task_id = str(uuid.uuid4())
        try:
            await run_in_threadpool(celery_app.send_task, full_name(name), kwargs=kwargs, task_id=task_id,
                                    retry=False)
        except Exception as exc:  # noqa: BLE001 - kombu raises several types when the broker is unreachable
            raise ApiError(503, f"The broker is unavailable ({type(exc).__name__}); try again later.") from None
        return Submitted(id=task_id, task=name, status_url=f"/tasks/{task_id}")

    @api.get("/tasks/{task_id}", response_model=TaskStatus, responses={422: {"description": "Not a task id"},
                                                                        503: {"description": "Backend unavailable"}})
    def status(task_id: str) -> TaskStatus:
        """State of a task; ``result``, ``retries``, ``worker`` and ``date_done`` once it has finished."""
        try:
            uuid.UUID(task_id)
        except ValueError:
            raise ApiError(422, f"{task_id[:64]!r} is not a task id; task ids are UUIDs.") from None
        result = celery_app.AsyncResult(task_id)
        try:
            state = result.state
            if state in ("SUCCESS", "FAILURE", "RETRY", "REVOKED"):
                meta = result._get_task_meta()
                date_done = meta.get("date_done")
                return TaskStatus(id=task_id, state=state, result=_jsonable(meta.get("result")),
                                  retries=meta.get("retries"), worker=meta.get("worker"),
                                  date_done=date_done.isoformat() if hasattr(date_done, "isoformat") else date_done)
        except Exception as exc:  # noqa: BLE001
            raise ApiError(503, f"The result backend is unavailable ({type(exc).__name__}).") from None
        return TaskStatus(id=task_id, state=state)

    @api.get("/healthz", response_model=Health, responses={503: {"description": "Broker or backend unreachable"}})
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

    return api


def _ping_backend(backend) -> None:
    client = getattr(backend, "client", None)
    if client is not None and hasattr(client, "ping"):
        client.ping()
        return
    if hasattr(backend, "ResultSession"):
        from sqlalchemy import text

        with backend.ResultSession() as session:
            session.execute(text("SELECT 1"))
