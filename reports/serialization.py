"""Offline serialization cost matrix: serializer × payload shape × payload size × compression.

Everything goes through kombu's own registries — ``kombu.serialization.dumps``/``loads`` and
``kombu.compression.compress``/``decompress`` — which is exactly the path a Celery message body takes (kombu's
``Producer._prepare`` serializes then compresses; ``Message.decode`` decompresses then deserializes). So the numbers
are what ``task_serializer`` and ``task_compression`` really cost, including kombu's wrappers.

What is measured per row (the ``serialization`` list of ``report.json``, plus ``shape`` and ``compression_ratio``):

* ``payload_bytes`` — length of the payload as compact-ish ``json.dumps`` (the nominal size the payload was built for);
* ``wire_bytes`` — length of the serialized and compressed body kombu would publish. Transport framing is not
  included (the Redis transport, for instance, base64-encodes bodies inside a JSON envelope);
* ``encode_us``/``decode_us`` — p50/p95 of serialize + compress, and of decompress + deserialize, in microseconds
  (``time.perf_counter_ns``). Decoding starts from ``bytes``, as a worker receives them.

How it stays fast: the serializer is measured once per (serializer, shape, size) and each compression once per
encoded body, instead of once per full combination; a row's distribution is the set of all pairwise sums of its two
stages' samples (the stages run one after the other on independent inputs, so this is their empirical convolution).
Repeats then adapt to a time budget — see :func:`run_matrix`.

Run time: on a 2-core machine the default matrix (3 serializers × 4 shapes × 5 sizes × 5 compressions) takes
50–55 s. About 37 s of that is a single encode + decode of each 1 MB YAML payload (kombu uses PyYAML's
pure-Python ``safe_dump``/``safe_load``: seconds per megabyte) and ~7 s a single lzma compression of each 1 MB body,
which no budget can skip; so in the default run the 1 MB stages (and lzma/bzip2 from 100 kB) get only one to a few
samples, and their p95 is then close to or equal to their p50. Pass a larger ``time_budget_s`` for tighter tails.
"""
from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from kombu import compression as kombu_compression
from kombu import serialization as kombu_serialization
from kombu.utils.encoding import ensure_bytes

from loadlab.stack.payloads import SHAPES, make_payload, payload_json_bytes

__all__ = [
    "SHAPES",
    "SIZES",
    "SERIALIZERS",
    "COMPRESSIONS",
    "DEFAULT_REPEATS",
    "DEFAULT_TIME_BUDGET_S",
    "make_payload",
    "payload_json_bytes",
    "available_compressions",
    "encode_body",
    "decode_body",
    "run_matrix",
]

#: Default nominal payload sizes in bytes of JSON.
SIZES: tuple[int, ...] = (100, 1_000, 10_000, 100_000, 1_000_000)
#: Serializers of the default matrix; ``pickle`` is measured only on request (``allow_pickle=True``).
SERIALIZERS: tuple[str, ...] = ("json", "msgpack", "yaml")
#: Compression names as Celery's ``task_compression`` takes them (``none`` = no compression).
COMPRESSIONS: tuple[str, ...] = ("none", "zlib", "bzip2", "lzma", "zstd")
DEFAULT_REPEATS = 50
#: Target wall time of :func:`run_matrix`; every cell is still measured at least once (see there).
DEFAULT_TIME_BUDGET_S = 45.0
#: Extra sampling time every cell may use even when the budget is spent, so cheap cells always reach ``repeats``.
_MIN_CELL_S = 0.01

# -------------------------------------------------------------------------------------------- kombu plumbing


def _kombu_method(name: str) -> str | None:
    """The kombu compression alias for a Celery ``task_compression`` name (``None`` for ``none``)."""
    return None if name == "none" else name


def available_compressions() -> tuple[str, ...]:
    """The names of :data:`COMPRESSIONS` that kombu can use in this environment.

    Asked of kombu's registry itself, not of importable packages: kombu 5.7 registers ``zstd`` only when
    ``backports.zstd`` (Python < 3.14) or ``compression.zstd`` (3.14+) imports — the ``zstandard`` package does not
    count — and Celery fails at publish time on a name kombu does not know.
    """
    names = []
    for name in COMPRESSIONS:
        method = _kombu_method(name)
        if method is None:
            names.append(name)
            continue
        try:
            kombu_compression.get_encoder(method)
        except KeyError:
            continue
        names.append(name)
    return tuple(names)


def _accept_for(content_type: str) -> set[str]:
    # What a worker with accept_content=[serializer] accepts; kombu refuses anything else.
    return {content_type}


@dataclass(frozen=True)
class EncodedBody:
    """A message body as kombu would publish it."""

    content_type: str
    content_encoding: str
    compression: str | None  # the ``compression`` header (a mime type such as application/x-gzip), if compressed
    body: bytes


def encode_body(payload: Any, serializer: str, compression: str = "none") -> EncodedBody:
    """Serialize then compress ``payload`` exactly as kombu's ``Producer._prepare`` does."""
    content_type, content_encoding, data = kombu_serialization.dumps(payload, serializer=serializer)
    method = _kombu_method(compression)
    if method is None:
        return EncodedBody(content_type, content_encoding, None, ensure_bytes(data))
    body, header = kombu_compression.compress(data, method)
    return EncodedBody(content_type, content_encoding, header, body)


def decode_body(encoded: EncodedBody) -> Any:
    """Decompress then deserialize, as kombu's ``Message`` does, accepting only the body's own content type."""
    body = encoded.body
    if encoded.compression is not None:
        body = kombu_compression.decompress(body, encoded.compression)
    return kombu_serialization.loads(
        body, encoded.content_type, encoded.content_encoding, accept=_accept_for(encoded.content_type)
    )


# ------------------------------------------------------------------------------------------------- validation


def _check_serializers(serializers: Iterable[str], allow_pickle: bool) -> tuple[str, ...]:
    names = tuple(serializers)
    if not names:
        raise ValueError("The serialization matrix needs at least one serializer; use json, msgpack or yaml.")
    for name in names:
        if name == "pickle":
            if not allow_pickle:
                raise ValueError(
                    "pickle runs arbitrary code when a message is decoded, "
                    "so it is measured only if you pass --allow-pickle."
                )
            continue
        if name not in SERIALIZERS:
            raise ValueError(
                f"Serializer {name!r} is not known; use json, msgpack, yaml, or pickle with --allow-pickle."
            )
        try:
            kombu_serialization.dumps({}, serializer=name)
        except Exception as exc:  # kombu registers yaml/msgpack placeholders that raise when the library is missing
            raise ValueError(
                f"Serializer {name!r} is not usable here ({exc}); install its library or leave it out."
            ) from exc
    return names


def _check_compressions(compressions: Iterable[str] | None) -> tuple[str, ...]:
    available = available_compressions()
    if compressions is None:
        return available
    names = tuple(compressions)
    if not names:
        raise ValueError("The serialization matrix needs at least one compression; use none to measure without.")
    for name in names:
        if name not in COMPRESSIONS:
            raise ValueError(f"Compression {name!r} is not known; use one of {', '.join(COMPRESSIONS)}.")
        if name not in available:
            hint = " (kombu needs the backports.zstd package for it on Python < 3.14)" if name == "zstd" else ""
            raise ValueError(
                f"Compression {name!r} is not available in this kombu install{hint}; install it or leave it out."
            )
    return names


def _check_shapes_sizes(shapes: Iterable[str], sizes: Iterable[int]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    shape_t, size_t = tuple(shapes), tuple(int(s) for s in sizes)
    for shape in shape_t:
        if shape not in SHAPES:
            raise ValueError(f"Payload shape {shape!r} is not known; use one of {', '.join(SHAPES)}.")
    if not shape_t or not size_t:
        raise ValueError("The serialization matrix needs at least one payload shape and one size.")
    if any(s <= 0 for s in size_t):
        raise ValueError(f"Payload sizes must be positive numbers of bytes; got {', '.join(map(str, size_t))}.")
    return shape_t, size_t


# -------------------------------------------------------------------------------------------------- measuring


@dataclass
class _Cell:
    """One measured stage: a serializer on one payload, or one compression on one serialized body."""

    encode: Callable[[], object]
    decode: Callable[[], object]
    enc_ns: list[int] = field(default_factory=list)
    dec_ns: list[int] = field(default_factory=list)

    @property
    def cost_ns(self) -> int:
        """What one encode + decode sample costs, from the pilot sample."""
        return max(self.enc_ns[0] + self.dec_ns[0], 1)

    def sample(self, times: int) -> None:
        clock, encode, decode = time.perf_counter_ns, self.encode, self.decode
        for _ in range(times):
            t0 = clock()
            encode()
            t1 = clock()
            decode()
            t2 = clock()
            self.enc_ns.append(t1 - t0)
            self.dec_ns.append(t2 - t1)


def _timed(call: Callable[[], Any]) -> tuple[Any, int]:
    t0 = time.perf_counter_ns()
    result = call()
    return result, time.perf_counter_ns() - t0


def _serializer_pilot(payload: Any, serializer: str) -> tuple[_Cell, bytes, str | bytes]:
    """Encode and decode once, timed: the pilot sample, and the body every other stage works from.

    Encoding each body exactly once matters: one YAML encode of 1 MB takes seconds.
    """
    (content_type, content_encoding, data), enc = _timed(
        lambda: kombu_serialization.dumps(payload, serializer=serializer)
    )
    raw = ensure_bytes(data)  # what the transport carries, and what a worker decodes from
    accept = _accept_for(content_type)
    _, dec = _timed(lambda: kombu_serialization.loads(raw, content_type, content_encoding, accept=accept))
    cell = _Cell(
        encode=lambda: kombu_serialization.dumps(payload, serializer=serializer),
        decode=lambda: kombu_serialization.loads(raw, content_type, content_encoding, accept=accept),
        enc_ns=[enc],
        dec_ns=[dec],
    )
    return cell, raw, data


def _compression_pilot(data: str | bytes, method: str) -> tuple[_Cell, int]:
    """Compress and decompress once, timed; also returns the compressed (wire) length."""
    (compressed, header), enc = _timed(lambda: kombu_compression.compress(data, method))
    _, dec = _timed(lambda: kombu_compression.decompress(compressed, header))
    cell = _Cell(
        encode=lambda: kombu_compression.compress(data, method),
        decode=lambda: kombu_compression.decompress(compressed, header),
        enc_ns=[enc],
        dec_ns=[dec],
    )
    return cell, len(compressed)


def _sample_within_budget(
    cells: Sequence[_Cell],
    repeats: int,
    deadline: float | None,
    on_cell: Callable[[], None],
) -> None:
    """Bring every cell (holding its pilot sample) up to ``repeats`` samples, or as many as the deadline allows.

    Water-filling: cells go cheapest first, each taking at most an equal share of the time left, so cheap cells
    take only what they need and leave the rest to the expensive ones.
    """
    order = sorted(cells, key=lambda c: c.cost_ns)
    for left, cell in zip(range(len(order), 0, -1), order, strict=True):
        if deadline is None:
            affordable = repeats
        else:
            share_s = max((deadline - time.perf_counter()) / left, _MIN_CELL_S)
            affordable = int(share_s * 1e9 // cell.cost_ns)
        if affordable >= repeats:
            # The pilot ran cold (first call on this input); drop it and take a full set of warm samples.
            del cell.enc_ns[:], cell.dec_ns[:]
            cell.sample(repeats)
        else:
            # Expensive cell: a cold start is negligible next to one sample, so the pilot counts.
            cell.sample(max(0, min(affordable, repeats - 1)))
        on_cell()


def _percentiles_us(first: list[int], second: list[int] | None) -> dict[str, float]:
    samples = np.asarray(first, dtype=np.float64)
    if second is not None:
        # Every pairing of the two stages' samples: the empirical distribution of their sum.
        samples = np.add.outer(samples, np.asarray(second, dtype=np.float64)).ravel()
    p50, p95 = np.percentile(samples, [50, 95]) / 1_000.0
    return {"p50": round(float(p50), 3), "p95": round(float(p95), 3)}


def run_matrix(
    serializers: Sequence[str] = SERIALIZERS,
    shapes: Sequence[str] = SHAPES,
    sizes: Sequence[int] = SIZES,
    compressions: Sequence[str] | None = None,
    repeats: int = DEFAULT_REPEATS,
    time_budget_s: float | None = DEFAULT_TIME_BUDGET_S,
    *,
    allow_pickle: bool = False,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure every serializer × shape × size × compression and return one row per combination.

    ``compressions=None`` means every one of :func:`available_compressions`. ``repeats`` is the most samples a stage
    gets. ``time_budget_s`` is the target wall time of the call: every stage is first measured once (which is also
    how its body is produced), then the time left is shared out, cheapest stages first, so small payloads get all
    ``repeats`` and 1 MB payloads (YAML, lzma) as many as fit. A single sample can take seconds, so slow stages can
    carry the call past the budget. ``None`` disables the adaptation: every stage gets exactly ``repeats``.
    ``progress(done, total)`` is called as stages finish (each stage counts twice: pilot, then sampling).

    Rows are ordered serializer, shape, size, compression, each exactly: ``serializer``, ``compression``, ``shape``,
    ``payload_bytes``, ``wire_bytes``, ``compression_ratio`` (serialized bytes / wire bytes), ``encode_us`` and
    ``decode_us`` (each ``{"p50", "p95"}``).
    """
    started = time.perf_counter()
    serializer_t = _check_serializers(serializers, allow_pickle)
    compression_t = _check_compressions(compressions)
    shape_t, size_t = _check_shapes_sizes(shapes, sizes)
    if int(repeats) < 1:
        raise ValueError(f"repeats must be at least 1; got {repeats}.")
    if time_budget_s is not None and time_budget_s <= 0:
        raise ValueError(f"The time budget must be a positive number of seconds; got {time_budget_s}.")

    payloads = {(shape, size): make_payload(shape, size, seed) for shape in shape_t for size in size_t}
    payload_bytes = {key: payload_json_bytes(p) for key, p in payloads.items()}
    compressed_methods = [name for name in compression_t if _kombu_method(name) is not None]
    total = 2 * len(serializer_t) * len(payloads) * (1 + len(compressed_methods))
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    ser_cells: dict[tuple[str, str, int], _Cell] = {}
    comp_cells: dict[tuple[str, str, int, str], _Cell] = {}
    raw_len: dict[tuple[str, str, int], int] = {}
    wire_len: dict[tuple[str, str, int, str], int] = {}
    # The payloads live for the whole run; freezing them keeps the garbage collector from re-scanning this
    # artificial heap during every timed call (a worker's heap does not hold twenty large payloads).
    # Only when nothing else froze objects: unfreeze() releases every frozen object, not just ours.
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.collect()
        gc.freeze()
    try:
        for serializer in serializer_t:
            for (shape, size), payload in payloads.items():
                ser_cells[serializer, shape, size], raw, data = _serializer_pilot(payload, serializer)
                raw_len[serializer, shape, size] = len(raw)
                tick()
                for name in compressed_methods:
                    method = _kombu_method(name)
                    assert method is not None
                    comp_cells[serializer, shape, size, name], wire_len[serializer, shape, size, name] = (
                        _compression_pilot(data, method)
                    )
                    tick()
        deadline = None if time_budget_s is None else started + time_budget_s
        _sample_within_budget([*ser_cells.values(), *comp_cells.values()], int(repeats), deadline, tick)
    finally:
        if freeze:
            gc.unfreeze()

    rows: list[dict[str, Any]] = []
    for serializer in serializer_t:
        for shape in shape_t:
            for size in size_t:
                ser = ser_cells[serializer, shape, size]
                uncompressed = raw_len[serializer, shape, size]
                for name in compression_t:
                    comp = comp_cells.get((serializer, shape, size, name))
                    wire = wire_len.get((serializer, shape, size, name), uncompressed)
                    rows.append(
                        {
                            "serializer": serializer,
                            "compression": name,
                            "shape": shape,
                            "payload_bytes": payload_bytes[shape, size],
                            "wire_bytes": wire,
                            "compression_ratio": round(uncompressed / wire, 4) if wire else 1.0,
                            "encode_us": _percentiles_us(ser.enc_ns, comp.enc_ns if comp else None),
                            "decode_us": _percentiles_us(ser.dec_ns, comp.dec_ns if comp else None),
                        }
                    )
    return rows
