"""The Locust Celery user's publish path: ``send_task`` with a producer the user holds.

``app.send_task`` without a producer takes one from the app's pool and gives it back on every call (kombu's pool
lock, the producer's connection prepared again): about 10 % of a publish's CPU on Redis. A user publishes from one
greenlet, one message at a time, so it keeps one producer for its life and hands it to ``send_task``; the signals
(the ledger's, metrics', tracing's), routing and message are Celery's own, unchanged. When the pool has no producer
left to hold (more users than ``broker_pool_limit``), the user publishes the plain way, sharing the pool.
"""
from __future__ import annotations

from kombu.exceptions import LimitExceeded


class HeldProducerPublisher:
    """One per user: ``send`` (``send_task``'s name, args, kwargs, headers and options) publishes through the held
    producer and returns the task id; ``release`` gives the producer back to the pool."""

    def __init__(self, app):
        self.app = app
        self._producer = None
        self._shared = False  # the pool had none to spare: publish through the pool each time

    def send(self, name: str, args: tuple | list, kwargs: dict | None, headers: dict | None, **options) -> str:
        producer = self._producer
        if producer is None and not self._shared:
            try:
                producer = self._producer = self.app.producer_pool.acquire(block=False)
            except LimitExceeded:
                self._shared = True
        try:
            return self.app.send_task(name, args=args, kwargs=kwargs, headers=headers, producer=producer,
                                      **options).id
        except Exception:
            self.release()  # the connection may be broken: the next publish takes a fresh producer
            raise

    def release(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.release()
