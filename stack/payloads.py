"""Bodies for the ``payload`` task and the serialization matrix: N bytes (as JSON) of a chosen shape, built
deterministically. One definition, so offline and in-band measurements use the same bodies."""
from __future__ import annotations

import json
import random
import string
import typing
from collections.abc import Callable
from typing import Any, Literal

#: Payload shapes: many short strings, a tree of small dicts, long lists of numbers, one long string.
PayloadShape = Literal["flat_strings", "nested_dicts", "numeric_lists", "large_text"]
SHAPES: tuple[str, ...] = typing.get_args(PayloadShape)

_ALNUM = string.ascii_letters + string.digits
_WORDS = tuple(
    "queue worker broker latency retry result celery task message payload backend prefetch ack delivery exchange "
    "routing key consumer producer timeout backoff throughput concurrency pool scaling contention the a of to and "
    "in is for on with as at by it from that this be are was".split()
)
_GROUP_SIZE = 16  # records per group in nested_dicts
_SERIES_LEN = 128  # numbers per list in numeric_lists




def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choices(_ALNUM, k=rng.randint(lo, hi)))


def _quoted_len(key: str) -> int:
    return len(key) + 2  # our keys and strings are ASCII letters/digits: JSON adds only the two quotes


def _flat_strings(rng: random.Random, size: int) -> dict[str, str]:
    body: dict[str, str] = {}
    total = 2  # "{}"
    while True:
        key, value = f"field_{len(body)}", _word(rng, 6, 24)
        cost = (2 if body else 0) + _quoted_len(key) + 2 + _quoted_len(value)
        if total + cost > size:
            if body:
                break
            value, cost = "", _quoted_len(key) + 4  # even the first field is too long: start from an empty one
        body[key] = value
        total += cost
        if total >= size:
            break
    last = next(reversed(body))
    body[last] += "".join(rng.choices(_ALNUM, k=max(0, size - total)))  # top up to the exact size
    return body


def _record(rng: random.Random, i: int) -> dict[str, Any]:
    return {
        "id": i,
        "name": _word(rng, 4, 12),
        "attrs": {
            "score": round(rng.uniform(0, 100), 3),
            "active": rng.random() < 0.5,
            "tags": {"primary": _word(rng, 3, 8), "secondary": _word(rng, 3, 8)},
        },
    }


def _nested_dicts(rng: random.Random, size: int) -> dict[str, dict[str, dict[str, Any]]]:
    body: dict[str, dict[str, dict[str, Any]]] = {}
    total = 2
    last: dict[str, Any] | None = None

    def cost_of(rec: dict[str, Any], group_key: str, item_key: str) -> int:
        item = _quoted_len(item_key) + 2 + len(json.dumps(rec))
        if group_key in body:
            return 2 + item
        return (2 if body else 0) + _quoted_len(group_key) + 2 + 2 + item  # a new group: its key and its braces

    while last is None or total < size:
        i = 0 if last is None else last["id"] + 1
        group_key, item_key = f"group_{i // _GROUP_SIZE}", f"item_{i % _GROUP_SIZE}"
        rec = _record(rng, i)
        cost = cost_of(rec, group_key, item_key)
        if total + cost > size:
            if last is not None:
                break
            rec = {"id": i, "name": ""}  # even the first record is too long: start from a minimal one
            cost = cost_of(rec, group_key, item_key)
        body.setdefault(group_key, {})[item_key] = rec
        last = rec
        total += cost
    assert last is not None
    last["name"] += "".join(rng.choices(_ALNUM, k=max(0, size - total)))  # top up to the exact size
    return body


def _numeric_lists(rng: random.Random, size: int) -> dict[str, list[float | int]]:
    body: dict[str, list[float | int]] = {}
    total = 2
    series: list[float | int] = []
    i = 0
    while True:
        s = i // _SERIES_LEN
        # even lists hold floats, odd lists ints: both kinds of number, in lists long enough to matter
        value: float | int = round(rng.uniform(-1000, 1000), 4) if s % 2 == 0 else rng.randint(-10**6, 10**6)
        num = len(repr(value))  # json.dumps writes finite floats and ints exactly as repr does
        key = f"series_{s}"
        cost = 2 + num if key in body else (2 if body else 0) + _quoted_len(key) + 2 + 2 + num
        # Stop while the rest is 0 or at least 3 bytes: the top-up below cannot close a gap of 1 or 2.
        if body and not (total + cost == size or total + cost <= size - 3):
            break
        if key not in body:
            series = body[key] = []
        series.append(value)
        total += cost
        i += 1
        if total >= size:
            break
    # Top up with integers of chosen width; each costs its digits plus ", ". Keep the remainder at 0 or ≥ 3 so it can
    # always be closed (integers stay ≤ 15 digits, well inside msgpack's 64-bit range).
    remaining = size - total
    while remaining >= 3:
        digits = min(15, remaining - 2)
        if 0 < remaining - (digits + 2) < 3:
            digits -= 3
        series.append(rng.randint(10 ** (digits - 1), 10**digits - 1))
        remaining -= digits + 2
    return body


def _large_text(rng: random.Random, size: int) -> str:
    length = max(0, size - 2)  # JSON adds the two quotes
    words: list[str] = []
    produced = 0
    while produced < length:
        batch = rng.choices(_WORDS, k=length // 5 + 8)  # ~5 characters per word with its space
        words.extend(batch)
        produced += sum(len(w) + 1 for w in batch)
    return " ".join(words)[:length]


_BUILDERS: dict[str, Callable[[random.Random, int], Any]] = {
    "flat_strings": _flat_strings,
    "nested_dicts": _nested_dicts,
    "numeric_lists": _numeric_lists,
    "large_text": _large_text,
}


def make_payload(shape: str, size_bytes: int, seed: int = 0) -> Any:
    """A JSON-able payload of ``shape`` whose ``json.dumps`` is ``size_bytes`` long (exact for ≥ 100 bytes).

    Deterministic for a given ``(shape, size_bytes, seed)``. All strings are ASCII letters, digits and spaces, so the
    JSON length is the byte length and every serializer round-trips the payload unchanged.
    """
    if shape not in _BUILDERS:
        raise ValueError(f"Payload shape {shape!r} is not known; use one of {', '.join(SHAPES)}.")
    if int(size_bytes) <= 0:
        raise ValueError(f"A payload size must be a positive number of bytes; got {size_bytes}.")
    return _BUILDERS[shape](random.Random(seed), int(size_bytes))


def payload_json_bytes(payload: Any) -> int:
    """Length in bytes of ``json.dumps(payload)`` — the nominal size of a payload."""
    return len(json.dumps(payload).encode("utf-8"))


def make_body(shape: str, size_bytes: int, seed: int = 0) -> Any:
    """The ``payload`` task's body: ``make_payload`` with an empty body for size 0."""
    return make_payload(shape, size_bytes, seed) if size_bytes > 0 else ""
