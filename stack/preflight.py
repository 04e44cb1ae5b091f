"""A broker and result backend given by URL are checked before anything starts: connect, authenticate, the database
exists, one round trip, within a few seconds. A failure is one sentence naming the option, the URL (password
masked), host:port and the cause, where the stack would otherwise wait a minute for workers that cannot connect."""
from __future__ import annotations

from urllib.parse import urlsplit

from loadlab.config.celery_config import pin_url_variables
from loadlab.config.settings import Settings, mask_url

TIMEOUT_S = 3.0


class PreflightError(Exception):
    """One sentence for the user (the CLI exits 2 on it)."""


def _where(url: str) -> str:
    parts = urlsplit(url)
    default = {"redis": 6379, "rediss": 6379, "amqp": 5672, "amqps": 5671, "pyamqp": 5672}.get(parts.scheme)
    try:
        port = parts.port or default
    except ValueError:
        port = default
    return f"{parts.hostname or 'localhost'}:{port}" if port else (parts.hostname or "localhost")


def _cause(exc: BaseException) -> str:
    exc = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's error
    text = " ".join(str(exc).split()) or type(exc).__name__
    if "FATAL:" in text:  # PostgreSQL: the server's own words
        text = text.rsplit("FATAL:", 1)[1].strip()
    if isinstance(exc, ConnectionRefusedError) or "refused" in text.lower() and "access" not in text.lower():
        return "connection refused"
    if isinstance(exc, TimeoutError) or "timed out" in text.lower():
        return f"no answer within {TIMEOUT_S:g}s"
    return text[:200].rstrip(".")


def _redis_round_trip(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=TIMEOUT_S, socket_timeout=TIMEOUT_S)
    try:
        client.ping()
    finally:
        client.close()


def _amqp_round_trip(url: str) -> None:
    from kombu import Connection

    with Connection(url, connect_timeout=TIMEOUT_S, transport_options={"max_retries": 0}) as connection:
        connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=TIMEOUT_S)
        connection.default_channel  # opens a channel: the vhost and the user's rights on it  # noqa: B018


def _sql_round_trip(url: str) -> None:
    from sqlalchemy import create_engine, text

    engine_url = url.removeprefix("db+")
    connect_args = {} if engine_url.startswith("sqlite") else {"connect_timeout": int(TIMEOUT_S)}
    engine = create_engine(engine_url, connect_args=connect_args, pool_pre_ping=False)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    finally:
        engine.dispose()


def check(option: str, url: str) -> None:
    """Raises PreflightError with the sentence when ``url`` cannot be used."""
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss"):
        probe = _redis_round_trip
    elif scheme in ("amqp", "amqps", "pyamqp"):
        probe = _amqp_round_trip
    elif scheme.startswith("db+"):
        probe = _sql_round_trip
    else:  # rpc:// rides on the broker, checked as the broker
        return
    try:
        probe(url)
    except Exception as exc:  # noqa: BLE001 - every failure becomes the sentence
        place = "" if scheme.startswith("db+sqlite") else f" at {_where(url)}"
        raise PreflightError(f"{option} {mask_url(url)}: cannot use it{place} ({_cause(exc)}); check that the "
                             "service runs there and that the URL's user, password and database are right.") from None


def preflight(settings: Settings) -> None:
    """The given broker and result backend (the embedded ones are started by loadlab and need no check)."""
    if settings.broker:
        check("--broker", settings.broker)
    if settings.backend and settings.backend != settings.broker:
        check("--backend", settings.backend)


INSPECT_TIMEOUT_S = 1.0


def foreign_consumers(settings: Settings) -> None:
    """Before the stack's workers start: a consumer already on one of the queues the run will use would take its
    tasks (a foreign worker logs them as unregistered, the run counts them lost). RabbitMQ: the consumer count of a
    passive declare (any consumer, Celery or not); Redis has no consumer count, so the workers that answer a
    broadcast and the queues they consume. Raises PreflightError naming the queue (exit 2)."""
    if not settings.broker:
        return  # the embedded broker is the run's own
    queues = settings.worker_queues
    scheme = urlsplit(settings.broker).scheme
    where = f"--broker {mask_url(settings.broker)}"
    advice = ("its tasks would go to that consumer instead of the run's workers (and count as lost): stop it, give "
              "other queues (--queue, --queues), or add --allow-foreign-consumers.")
    if scheme in ("amqp", "amqps", "pyamqp"):
        for queue, count in _amqp_consumer_counts(settings.broker, queues).items():
            if count:
                raise PreflightError(f"queue {queue!r} on {where} already has {count} consumer(s) that are not this "
                                     f"run's; {advice}")
    elif scheme in ("redis", "rediss"):
        for worker, consumed in _redis_workers_queues(settings.broker).items():
            taken = [q for q in queues if q in consumed]
            if taken:
                raise PreflightError(f"queue {taken[0]!r} on {where} is already consumed by the worker {worker}, "
                                     f"which is not this run's; {advice}")


def _amqp_consumer_counts(url: str, queues: list[str]) -> dict[str, int]:
    from amqp.exceptions import NotFound
    from kombu import Connection

    counts = {}
    with Connection(url, connect_timeout=TIMEOUT_S) as connection:
        channel = connection.channel()
        for queue in queues:
            try:
                counts[queue] = channel.queue_declare(queue=queue, passive=True).consumer_count
            except NotFound:  # no such queue yet: nobody consumes it; the error closed the channel
                counts[queue] = 0
                channel = connection.channel()
    return counts


def _redis_workers_queues(url: str) -> dict[str, set[str]]:
    from celery import Celery

    pin_url_variables(url, None)  # the run's broker (--broker), not a CELERY_BROKER_URL of the environment
    app = Celery("loadlab-preflight", broker=url, set_as_current=False)
    app.conf.update(accept_content=["json"], broker_connection_timeout=TIMEOUT_S, broker_connection_retry=False,
                    broker_connection_retry_on_startup=False)
    try:
        replies = app.control.inspect(timeout=INSPECT_TIMEOUT_S).active_queues() or {}
    finally:
        app.close()
    return {worker: {q.get("name") for q in queues or ()} for worker, queues in replies.items()}
