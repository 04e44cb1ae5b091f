"""Offline serialization matrix (reports/serialization.py), checked against kombu itself."""
from __future__ import annotations

import itertools
import json
from collections import Counter
from typing import Any

import pytest
from kombu import compression as kc
from kombu import serialization as ks

from loadlab.reports.serialization import (
    COMPRESSIONS,
    SHAPES,
    SIZES,
    available_compressions,
    decode_body,
    encode_body,
    make_payload,
    run_matrix,
)

SMALL_SIZES = (100, 10_000)
SERIALIZERS = ("json", "msgpack", "yaml")
ROW_KEYS = {
    "serializer",
    "compression",
    "shape",
    "payload_bytes",
    "wire_bytes",
    "compression_ratio",
    "encode_us",
    "decode_us",
}


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return run_matrix(serializers=SERIALIZERS, sizes=SMALL_SIZES, repeats=5, time_budget_s=None)


def kombu_wire(payload: Any, serializer: str, compression: str) -> tuple[bytes, bytes]:
    """(serialized bytes, wire bytes), computed directly with kombu as Producer._prepare does."""
    _, _, data = ks.dumps(payload, serializer=serializer)
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if compression == "none":
        return raw, raw
    body, _ = kc.compress(data, compression)
    return raw, body


def test_every_combination_is_present_exactly_once(rows: list[dict[str, Any]]) -> None:
    compressions = available_compressions()
    expected = set(itertools.product(SERIALIZERS, SHAPES, SMALL_SIZES, compressions))
    seen = Counter((r["serializer"], r["shape"], r["payload_bytes"], r["compression"]) for r in rows)
    assert set(seen) == expected
    assert all(count == 1 for count in seen.values())
    assert len(rows) == len(expected)


def test_rows_have_exactly_the_contract_fields(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        assert set(row) == ROW_KEYS
        for key in ("encode_us", "decode_us"):
            assert set(row[key]) == {"p50", "p95"}
            assert 0 < row[key]["p50"] <= row[key]["p95"]
    json.dumps(rows, allow_nan=False)


def test_wire_bytes_match_kombus_own_output(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        payload = make_payload(row["shape"], row["payload_bytes"])
        raw, wire = kombu_wire(payload, row["serializer"], row["compression"])
        assert row["wire_bytes"] == len(wire), row
        assert row["compression_ratio"] == pytest.approx(len(raw) / len(wire), abs=1e-4), row


def test_no_compression_has_ratio_one_and_compression_shrinks_text(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        if row["compression"] == "none":
            assert row["compression_ratio"] == 1.0
        elif row["shape"] == "large_text" and row["payload_bytes"] == 10_000:
            assert row["compression_ratio"] > 2, row


@pytest.mark.parametrize("serializer", SERIALIZERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trips_are_lossless(serializer: str, shape: str) -> None:
    payload = make_payload(shape, 10_000, seed=7)
    for compression in available_compressions():
        # Independently through kombu: dumps → compress → decompress → loads.
        content_type, content_encoding, data = ks.dumps(payload, serializer=serializer)
        body: Any = data
        if compression != "none":
            compressed, header = kc.compress(data, compression)
            body = kc.decompress(compressed, header)
        assert ks.loads(body, content_type, content_encoding, accept={content_type}) == payload
        # And through the module's helpers.
        assert decode_body(encode_body(payload, serializer, compression)) == payload


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", [100, 137, 1_000, 10_000, 100_000])
def test_payload_json_size_is_the_nominal_size(shape: str, size: int) -> None:
    payload = make_payload(shape, size)
    actual = len(json.dumps(payload).encode("utf-8"))
    assert abs(actual - size) <= 0.1 * size
    assert actual == size  # the builders top up to the exact byte


@pytest.mark.parametrize("shape", SHAPES)
def test_payloads_are_deterministic_per_seed(shape: str) -> None:
    assert make_payload(shape, 2_000, seed=3) == make_payload(shape, 2_000, seed=3)
    assert make_payload(shape, 2_000, seed=3) != make_payload(shape, 2_000, seed=4)


def test_shapes_look_like_their_names() -> None:
    assert all(isinstance(v, str) for v in make_payload("flat_strings", 1_000).values())
    nested = make_payload("nested_dicts", 1_000)
    group = next(iter(nested.values()))
    assert isinstance(next(iter(group.values()))["attrs"]["tags"], dict)
    lists = make_payload("numeric_lists", 5_000)
    numbers = [x for series in lists.values() for x in series]
    assert any(isinstance(x, float) for x in numbers) and any(isinstance(x, int) for x in numbers)
    assert isinstance(make_payload("large_text", 1_000), str)


def test_pickle_is_refused_without_allow_pickle() -> None:
    with pytest.raises(ValueError, match="--allow-pickle"):
        run_matrix(serializers=("json", "pickle"), sizes=(100,), repeats=1)
    rows = run_matrix(
        serializers=("pickle",), shapes=("flat_strings",), sizes=(100,), compressions=("none",), repeats=2,
        allow_pickle=True,
    )
    _, wire = kombu_wire(make_payload("flat_strings", 100), "pickle", "none")
    assert [(r["serializer"], r["wire_bytes"]) for r in rows] == [("pickle", len(wire))]


def test_available_compressions_follow_kombus_registry() -> None:
    names = available_compressions()
    assert names[0] == "none"
    assert {"zlib", "bzip2", "lzma"} <= set(names) <= set(COMPRESSIONS)
    try:
        kc.get_encoder("zstd")
        zstd_registered = True
    except KeyError:
        zstd_registered = False
    assert ("zstd" in names) == zstd_registered


def test_bad_arguments_are_refused_in_plain_sentences() -> None:
    with pytest.raises(ValueError, match="not known"):
        run_matrix(compressions=("snappy",), sizes=(100,), repeats=1)
    with pytest.raises(ValueError, match="not known"):
        run_matrix(shapes=("cubes",), sizes=(100,), repeats=1)
    with pytest.raises(ValueError, match="not known"):
        run_matrix(serializers=("xml",), sizes=(100,), repeats=1)
    if "zstd" not in available_compressions():
        with pytest.raises(ValueError, match="backports.zstd"):
            run_matrix(compressions=("zstd",), sizes=(100,), repeats=1)


def test_a_spent_budget_still_measures_every_combination_once() -> None:
    calls: list[tuple[int, int]] = []
    rows = run_matrix(
        serializers=("json", "msgpack"), sizes=(100, 1_000), repeats=50, time_budget_s=1e-6,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert len(rows) == 2 * len(SHAPES) * 2 * len(available_compressions())
    assert calls and calls[-1][0] == calls[-1][1]
    assert [done for done, _ in calls] == list(range(1, len(calls) + 1))


def test_defaults_are_the_documented_matrix() -> None:
    assert SIZES == (100, 1_000, 10_000, 100_000, 1_000_000)
    assert SHAPES == ("flat_strings", "nested_dicts", "numeric_lists", "large_text")


def test_measured_totals_count_kombus_own_encodes_and_decodes() -> None:
    """The in-band share's numerator: the timed kombu registry's histograms, read back from the exposition format
    as a run's final scrape has them, count exactly the encodes and decodes that happened and their bytes."""
    from prometheus_client import CollectorRegistry, generate_latest

    from loadlab.exporters import serializers
    from loadlab.exporters.metrics import STORE
    from loadlab.reports.report import serialization_totals

    def totals() -> dict:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(STORE.collector())
        return serialization_totals(generate_latest(registry).decode()).get("msgpack", {})

    was_installed = serializers.installed()
    serializers.install()
    try:
        before = totals()
        payload = make_payload("nested_dicts", 10_000)
        wire = 0
        for _ in range(25):
            content_type, content_encoding, data = ks.dumps(payload, serializer="msgpack")
            wire += len(data)
            assert ks.loads(data, content_type, content_encoding, accept={content_type}) == payload
        after = totals()
    finally:
        if not was_installed:
            serializers.uninstall()
    for direction in ("encode", "decode"):
        was = before.get(direction, {"count": 0, "seconds": 0.0, "bytes": 0.0})
        assert after[direction]["count"] - was["count"] == 25
        assert after[direction]["bytes"] - was["bytes"] == wire
        assert after[direction]["seconds"] - was["seconds"] > 0
