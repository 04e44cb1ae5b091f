"""The exporter service: broker-side and event-side metrics of any Celery deployment, on one ``/metrics``.

Started by the stack (``metrics=on``) and standalone as ``loadlab exporter --broker URL [--queues a,b]``.

What it reports
  ``celery_queue_length{queue}``   ready messages. Redis: ``LLEN`` of the list plus its priority sub-lists (kombu's
                                   ``queue``, ``queue\\x06\\x163``, ``…6``, ``…9``: the channel's ``priority_steps`` and
                                   ``sep``, read from the transport so custom steps and ``global_keyprefix`` work),
                                   in one pipeline. RabbitMQ (and other transports): ``message_count`` of a passive
                                   ``queue_declare``. A queue that does not exist reads 0 on both.
  ``celery_queue_unacked{queue}``  Redis only: delivered but not yet acknowledged messages. kombu keeps them for every
                                   queue of a database in one hash, with no per-queue index, so the size of that hash is
                                   reported once, as ``queue="*"`` (splitting it would mean reading every message body
                                   each collection). RabbitMQ does not tell unacked counts over AMQP (only its
                                   management API does), so the series is absent there rather than a made-up 0;
                                   ``celery_queue_consumers{queue}`` (from the same passive declare) is reported instead.
  ``celery_worker_up{hostname}``   1 while the worker's heartbeats arrive: down after ``--worker-timeout`` seconds
                                   without one (default 2.5 × the heartbeat interval the worker announces, i.e. 5 s),
                                   at once on ``worker-offline``. Workers send heartbeats whenever heartbeats are not
                                   disabled, without ``-E``. A worker silent for 10 minutes is forgotten (its series
                                   goes away), so recycled container hostnames do not pile up.
  ``celery_worker_tasks_active{hostname}``  the ``active`` count of the last heartbeat (0 when the worker is down).
  ``celery_task_*_total{task}``, ``celery_task_runtime_seconds{task}``  only with ``--task-events``: counted from task
                                   events, for apps that are not instrumented in-process (the stack's workers are, so
                                   there it stays off: the same series from two places would double every sum). The
                                   exporter then asks workers to send task events (``enable_events``, fire and forget).
  ``loadlab_exporter_last_collection_age_seconds{source}``  seconds since the last successful broker poll
                                   (``source="broker"``) or the last moment the event stream was known to be up
                                   (``source="events"``); with ``loadlab_exporter_collection_errors_total{source}``,
                                   ``loadlab_exporter_collection_duration_seconds`` and ``loadlab_exporter_events_total``.

Design: a scrape never touches the broker. One thread polls the broker every ``--interval``, another consumes the
event stream; the HTTP handler only formats the last values. While the event stream is down, worker liveness is
judged as of the moment it was last up (the last values, frozen) and the age metric grows, so a broker outage is
not reported as every worker dying. Event handling is deliberately lean (see :class:`EventState`): no per-task
objects, no clock adjustment, a bounded id -> task-name map; ``loadlab bench exporter`` measures it against Flower.
"""
from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading
import time

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from loadlab.exporters import metrics as names
from loadlab.exporters.event_state import RUNTIME_METRIC, TASK_COUNTERS, EventState, _le

log = logging.getLogger("loadlab.exporter")

EVENTS_STALE_AFTER_S = 3.0         # the receiver ticks at least every second while connected
ENABLE_EVENTS_EVERY_S = 30.0
UNACKED_ALL_QUEUES = "*"
QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,200}$")


# --- broker polling --------------------------------------------------------------------------------------------------
class BrokerPoller:
    """Queue lengths (and what else the transport tells) in one round trip per transport; keeps its connection."""

    def __init__(self, app, queues: list[str]):
        self.app = app
        self.queues = list(queues)
        self._conn = None

    def reset(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - the broker is gone anyway
                pass

    def _connection(self):
        if self._conn is None:
            conn = self.app.connection_for_read()
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=5)
            self._conn = conn
        return self._conn

    def poll(self) -> dict:
        conn = self._connection()
        if conn.transport.driver_type == "redis":
            return self._poll_redis(conn)
        return self._poll_declare(conn)

    def _poll_redis(self, conn) -> dict:
        channel = conn.default_channel
        steps = sorted(set(channel.priority_steps)) or [0]
        sep = channel.sep
        with channel.client.pipeline(transaction=False) as pipe:
            for queue in self.queues:
                for pri in steps:
                    pipe.llen(f"{queue}{sep}{pri}" if pri else queue)
            pipe.hlen(channel.unacked_key)
            replies = pipe.execute()
        lengths = {}
        for index, queue in enumerate(self.queues):
            chunk = replies[index * len(steps):(index + 1) * len(steps)]
            lengths[queue] = sum(n for n in chunk if isinstance(n, int))
        return {"length": lengths, "unacked": {UNACKED_ALL_QUEUES: int(replies[-1] or 0)}, "consumers": {}}

    def _poll_declare(self, conn) -> dict:
        lengths, consumers = {}, {}
        channel = conn.channel()
        try:
            for queue in self.queues:
                try:
                    _name, count, active = channel.queue_declare(queue=queue, passive=True)
                except conn.channel_errors:
                    # NOT_FOUND closes the channel: the queue does not exist (yet), which reads as empty
                    count = active = 0
                    channel = conn.channel()
                lengths[queue] = int(count)
                consumers[queue] = int(active)
        finally:
            try:
                channel.close()
            except Exception:  # noqa: BLE001
                pass
        return {"length": lengths, "unacked": {}, "consumers": consumers}


# --- the service -----------------------------------------------------------------------------------------------------
def _make_receiver_class():
    from celery.events.receiver import EventReceiver

    class LeanReceiver(EventReceiver):
        """Hands event bodies straight to the handler (no clock or timestamp adjustment: liveness uses the local
        receive time) and reports each loop iteration, so the exporter knows the stream is up."""

        connect_max_retries = 1

        def __init__(self, channel, *, handle, on_ready, on_tick, app):
            super().__init__(channel, handlers={}, app=app)
            self._handle, self._on_ready, self._on_tick = handle, on_ready, on_tick

        def on_consume_ready(self, connection, channel, consumers, wakeup=True, **kwargs):
            self._on_ready()
            super().on_consume_ready(connection, channel, consumers, wakeup=wakeup, **kwargs)

        def on_iteration(self):
            if self._on_tick():
                self.should_stop = True

        def on_connection_error(self, exc, interval):
            log.warning("event stream: %s (retrying)", exc)

        def _receive(self, body, message, list=list, isinstance=isinstance):  # noqa: A002 - Celery's signature
            handle = self._handle
            if isinstance(body, list):
                for event in body:
                    handle(event)
            else:
                handle(body)

    return LeanReceiver


class ExporterService:
    def __init__(self, app, queues: list[str], *, interval_s: float,
                 worker_timeout_s: float | None = None, task_events: bool = False, task_detail: bool = False):
        self.app = app
        self.queues = list(dict.fromkeys(queues))
        self.interval_s = interval_s
        self.worker_timeout_s = worker_timeout_s
        self.task_events = task_events or task_detail
        if task_detail:
            from loadlab.exporters.event_detail import DetailedEventState

            self.state = DetailedEventState()
        else:
            self.state = EventState(task_events=task_events)
        self.poller = BrokerPoller(app, self.queues)
        self.started_at = time.monotonic()
        self.broker_snapshot: dict | None = None
        self.broker_ok_at: float | None = None
        self.broker_duration_s = 0.0
        self.events_ok_at: float | None = None
        self.errors = {"broker": 0, "events": 0}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    # -- lifecycle --------------------------------------------------------------------------------------------------
    def start(self) -> "ExporterService":
        for target, name in ((self._poll_loop, "exporter-broker"), (self._events_loop, "exporter-events")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def serve(self, host: str, port: int) -> int:
        from prometheus_client import start_http_server

        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=3)
        self.poller.reset()

    # -- collection threads -----------------------------------------------------------------------------------------
    def _poll_loop(self) -> None:
        last_enable = 0.0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                snapshot = self.poller.poll()
            except Exception as exc:  # noqa: BLE001 - any broker failure: keep the last values, count, retry
                self.errors["broker"] += 1
                log.warning("broker poll failed: %s: %s", type(exc).__name__, exc)
                self.poller.reset()
            else:
                self.broker_snapshot = snapshot
                self.broker_ok_at = time.monotonic()
                self.broker_duration_s = self.broker_ok_at - started
                if self.task_events and self.broker_ok_at - last_enable >= ENABLE_EVENTS_EVERY_S:
                    last_enable = self.broker_ok_at
                    try:
                        self.app.control.enable_events()  # a broadcast without replies: nothing to wait for
                    except Exception as exc:  # noqa: BLE001
                        log.warning("enable_events broadcast failed: %s", exc)
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def _events_loop(self) -> None:
        receiver_class = _make_receiver_class()
        backoff = 0.5

        def ready():
            nonlocal backoff
            backoff = 0.5
            self.events_ok_at = time.monotonic()

        def tick():
            self.events_ok_at = time.monotonic()
            return self._stop.is_set()

        while not self._stop.is_set():
            try:
                with self.app.connection_for_read() as conn:
                    receiver = receiver_class(conn, handle=self.state.handle, on_ready=ready, on_tick=tick,
                                              app=self.app)
                    for _ in receiver.consume(limit=None, timeout=None, wakeup=True):
                        pass
            except Exception as exc:  # noqa: BLE001 - broker gone: retry with backoff, serve what we had
                if self._stop.is_set():
                    break
                self.errors["events"] += 1
                log.warning("event stream lost: %s: %s", type(exc).__name__, exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    # -- reading ----------------------------------------------------------------------------------------------------
    def events_reference_time(self, now: float) -> float:
        """``now`` while the event stream is up; the moment it was last up while it is down."""
        if self.events_ok_at is None:
            return now
        return now if now - self.events_ok_at <= EVENTS_STALE_AFTER_S else self.events_ok_at


class _Collector:
    """Formats the service's last values; never touches the broker."""

    def __init__(self, service: ExporterService):
        self.service = service

    def describe(self):
        return []

    def collect(self):
        svc = self.service
        now = time.monotonic()
        snapshot = svc.broker_snapshot
        if snapshot is not None:
            length = GaugeMetricFamily(names.QUEUE_LENGTH, "Messages ready in the queue (Redis: the list and "
                                       "its priority sub-lists; RabbitMQ: passive declare message_count).",
                                       labels=["queue"])
            for queue, n in snapshot["length"].items():
                length.add_metric([queue], n)
            yield length
            if snapshot["unacked"]:
                unacked = GaugeMetricFamily(names.QUEUE_UNACKED, "Messages delivered to workers and not yet "
                                            "acknowledged (Redis keeps one hash for every queue: queue=\"*\").",
                                            labels=["queue"])
                for queue, n in snapshot["unacked"].items():
                    unacked.add_metric([queue], n)
                yield unacked
            if snapshot["consumers"]:
                consumers = GaugeMetricFamily("celery_queue_consumers", "Consumers of the queue (passive declare).",
                                              labels=["queue"])
                for queue, n in snapshot["consumers"].items():
                    consumers.add_metric([queue], n)
                yield consumers

        status = svc.state.worker_status(svc.events_reference_time(now), svc.worker_timeout_s)
        up = GaugeMetricFamily(names.WORKER_UP, "1 while the worker's heartbeats arrive within the timeout.",
                               labels=["hostname"])
        active = GaugeMetricFamily(names.WORKER_TASKS_ACTIVE, "Tasks the worker is executing (its last "
                                   "heartbeat).", labels=["hostname"])
        for host, (is_up, n_active) in sorted(status.items()):
            up.add_metric([host], is_up)
            active.add_metric([host], n_active)
        yield up
        yield active

        if hasattr(svc.state, "families"):  # the detailed mode formats its own label sets
            yield from svc.state.families()
        elif svc.task_events:
            counts, runtime = svc.state.task_snapshot()
            for etype, metric in TASK_COUNTERS.items():
                family = CounterMetricFamily(metric, f"Tasks seen in {etype} events.", labels=["task"])
                for task, n in counts[etype].items():
                    family.add_metric([task], n)
                yield family
            hist = HistogramMetricFamily(RUNTIME_METRIC, "Task runtime from task-succeeded events.", labels=["task"])
            bounds = svc.state.buckets
            for task, row in runtime.items():
                cumulative, buckets = 0, []
                for bound, n in zip((*bounds, float("inf")), row[:-1]):
                    cumulative += n
                    buckets.append((_le(bound), cumulative))
                hist.add_metric([task], buckets, row[-1])
            yield hist

        age = GaugeMetricFamily("loadlab_exporter_last_collection_age_seconds", "Seconds since the last successful "
                                "collection (broker poll, or the event stream last known up).", labels=["source"])
        age.add_metric(["broker"], now - (svc.broker_ok_at or svc.started_at))
        age.add_metric(["events"], now - (svc.events_ok_at or svc.started_at))
        yield age
        errors = CounterMetricFamily("loadlab_exporter_collection_errors", "Failed broker polls and lost event "
                                     "streams.", labels=["source"])
        for source, n in svc.errors.items():
            errors.add_metric([source], n)
        yield errors
        duration = GaugeMetricFamily("loadlab_exporter_collection_duration_seconds", "Duration of the last successful "
                                     "broker poll.", labels=["source"])
        duration.add_metric(["broker"], svc.broker_duration_s)
        yield duration
        yield CounterMetricFamily("loadlab_exporter_events", "Events received from the event stream.",
                                  value=svc.state.events)




# --- entry point -----------------------------------------------------------------------------------------------------
def parse_queues(text: str | None) -> list[str]:
    queues = [q.strip() for q in (text or "").split(",") if q.strip()]
    for queue in queues:
        if not QUEUE_NAME.match(queue):
            raise ValueError(f"--queues {queue!r} is not a queue name; use letters, digits and _ . : @ - separated "
                             "by commas.")
    return queues


def exporter_app(settings):
    """The Celery app whose broker is watched: the user's ``--app``, else a bare app with loadlab's broker options
    (short connect timeouts, so a dead broker fails a poll instead of hanging it)."""
    from celery import Celery
    from celery.utils.imports import symbol_by_name

    from loadlab.config.celery_config import celery_config, pin_url_variables, use_stack_urls

    if settings.app:
        app = symbol_by_name(settings.app)
        use_stack_urls(app, settings)
        return app
    pin_url_variables(settings.broker, settings.backend)
    app = Celery("loadlab-exporter", broker=settings.broker, set_as_current=False)
    config = celery_config(settings)
    app.conf.update({k: v for k, v in config.items() if k.startswith(("broker_", "accept_content", "event_"))})
    return app


def main(argv: list[str] | None = None) -> int:
    from loadlab.config.settings import Settings

    parser = argparse.ArgumentParser(prog="python -m loadlab.exporters.exporter_service", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=None, help="bind address (default: settings metrics_host)")
    parser.add_argument("--port", type=int, default=None, help="port (default: settings metrics_port, else exporter_port)")
    parser.add_argument("--queues", default="", help="comma-separated queues to watch besides settings.queue")
    parser.add_argument("--worker-timeout", type=float, default=None,
                        help="seconds without a heartbeat before celery_worker_up reads 0 (default 2.5 × its interval)")
    parser.add_argument("--task-events", action="store_true", help="count task events (apps not instrumented in-process)")
    parser.add_argument("--task-detail", action="store_true",
                        help="with task events, keep celery-exporter's series: counters and runtime/queue-wait "
                             "histograms by task, hostname and queue")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    settings = Settings.from_env()
    if not settings.broker and not settings.app:
        print("error: the exporter needs --broker (or LOADLAB_BROKER).", file=sys.stderr)
        return 2
    try:
        queues = [*settings.worker_queues, *parse_queues(args.queues)]  # in a stack: what its workers consume
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    host = args.host or settings.metrics_host
    port = args.port if args.port is not None else (settings.metrics_port or settings.exporter_port)
    service = ExporterService(exporter_app(settings), queues, interval_s=settings.exporter_interval_s,
                              worker_timeout_s=args.worker_timeout, task_events=args.task_events,
                              task_detail=args.task_detail)
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: done.set())
    try:
        bound = service.serve(host, port)
    except OSError as exc:
        print(f"error: cannot listen on {host}:{port} ({exc.strerror}); pick another --metrics-port.", file=sys.stderr)
        return 2
    service.start()
    log.info("serving http://%s:%d/metrics  broker %s  queues %s", host, bound,
             Settings.masked(settings)["broker"] or settings.app, ",".join(service.queues))
    while not done.wait(1.0):
        pass
    service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
