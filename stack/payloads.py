"""Bodies for the ``payload`` task: N bytes (as JSON) of a chosen shape, built deterministically."""
from __future__ import annotations

import json
import random

SHAPES = ("flat_strings", "nested_dicts", "numeric_lists", "large_text")


def make_body(shape: str, size_bytes: int, seed: int = 0) -> object:
    """A JSON-able body whose JSON encoding is about ``size_bytes`` long."""
    if shape not in SHAPES:
        raise ValueError(f"payload shape {shape!r} is not known; use one of {', '.join(SHAPES)}.")
    rng = random.Random(seed)
    if shape == "large_text":
        words = ("queue", "worker", "broker", "latency", "retry", "result", "celery", "task")
        text = " ".join(rng.choice(words) for _ in range(max(1, size_bytes // 6)))
        return text[: max(0, size_bytes - 2)]
    body: object
    if shape == "flat_strings":
        body, add = {}, lambda i: body.__setitem__(f"k{i}", "v" * 24)
    elif shape == "numeric_lists":
        body, add = [], lambda i: body.append(round(rng.random() * 1e6, 3))
    else:
        body = {}

        def add(i):
            body[f"n{i}"] = {"id": i, "name": f"item-{i}", "tags": ["a", "b"], "child": {"v": i * 2}}
    i = 0
    # grow in steps and stop just past the target: building stays O(size)
    size = 2
    while size < size_bytes:
        add(i)
        i += 1
        if i % 64 == 0 or size_bytes < 4096:
            size = len(json.dumps(body))
        else:
            size += 36
    return body
