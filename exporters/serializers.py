"""Timed serializers: kombu's registered encoders and decoders, wrapped in place (same names, content types and
encodings) so that every encode and decode in this process records its time and the body's size in
``celery_task_serialization_seconds{direction,serializer}`` and ``celery_task_message_bytes{direction,serializer}``.

Wrapping the registry (not Celery's task classes) catches every path that serializes: task messages published by
producers, their decoding in pool children, results written and read through the result backend. It must happen
before a result backend is created (Celery backends copy the encoder when they are built), which ``make_app`` does.
Forked pool children inherit the wrapped registry; their observations land in their own slot of the metric store.
"""
from __future__ import annotations

from time import perf_counter

from kombu.serialization import registry

from loadlab.exporters.metrics import INSTRUMENTS, STORE

ENCODE, DECODE = "encode", "decode"
_originals: dict[tuple[str, str], object] = {}  # ("encoder", name) / ("decoder", content type) -> original function


def _size(payload) -> int:
    if isinstance(payload, str):
        # kombu's json is ASCII-only, so len() is the byte count without re-encoding; others encode for the count
        return len(payload) if payload.isascii() else len(payload.encode("utf-8"))
    try:
        return len(payload)
    except TypeError:
        return 0


def _timed_encoder(encoder, name: str):
    record = STORE.histogram_pair_recorder(INSTRUMENTS.serialization.labels(ENCODE, name).keys,
                                           INSTRUMENTS.message_bytes.labels(ENCODE, name).keys)

    def encode(data):
        started = perf_counter()
        payload = encoder(data)
        elapsed = perf_counter() - started
        try:  # kombu's bodies are bytes-like or str: anything else counts 0 bytes rather than break the call
            nbytes = len(payload) if payload.__class__ is not str or payload.isascii() else _size(payload)
        except TypeError:
            nbytes = 0
        record(elapsed, nbytes)
        return payload

    encode.__wrapped__ = encoder
    encode.__loadlab_timed__ = True
    return encode


def _timed_decoder(decoder, name: str):
    record = STORE.histogram_pair_recorder(INSTRUMENTS.serialization.labels(DECODE, name).keys,
                                           INSTRUMENTS.message_bytes.labels(DECODE, name).keys)

    def decode(data):
        started = perf_counter()
        value = decoder(data)
        elapsed = perf_counter() - started
        try:
            nbytes = len(data) if data.__class__ is not str or data.isascii() else _size(data)
        except TypeError:
            nbytes = 0
        record(elapsed, nbytes)
        return value

    decode.__wrapped__ = decoder
    decode.__loadlab_timed__ = True
    return decode


def install() -> None:
    """Wrap every registered codec once (later calls are no-ops; codecs registered later stay as they are)."""
    for name, codec in list(registry._encoders.items()):
        if getattr(codec.encoder, "__loadlab_timed__", False):
            continue
        _originals[("encoder", name)] = codec.encoder
        registry._encoders[name] = codec._replace(encoder=_timed_encoder(codec.encoder, name))
    for content_type, decoder in list(registry._decoders.items()):
        if getattr(decoder, "__loadlab_timed__", False):
            continue
        _originals[("decoder", content_type)] = decoder
        name = registry.type_to_name.get(content_type, content_type)
        registry._decoders[content_type] = _timed_decoder(decoder, name)
    if registry._default_encode is not None and not getattr(registry._default_encode, "__loadlab_timed__", False):
        # the default serializer's tuple is copied out of _encoders when it is set: refresh it
        for name, codec in registry._encoders.items():
            if codec.content_type == registry._default_content_type:
                registry._default_encode = codec.encoder
                break


def uninstall() -> None:
    """Put the original codecs back (tests, or a process that turns metrics off again)."""
    for (kind, key), original in list(_originals.items()):
        if kind == "encoder" and key in registry._encoders:
            registry._encoders[key] = registry._encoders[key]._replace(encoder=original)
        elif kind == "decoder" and key in registry._decoders:
            registry._decoders[key] = original
    if getattr(registry._default_encode, "__loadlab_timed__", False):
        registry._default_encode = registry._default_encode.__wrapped__
    _originals.clear()


def installed() -> bool:
    return any(getattr(codec.encoder, "__loadlab_timed__", False) for codec in registry._encoders.values())
