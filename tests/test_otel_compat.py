"""The fast paths beside OpenTelemetry's public API: each behind a probe that falls back to the public API, all of
them behind one switch, and no private name of opentelemetry-sdk, contrib or Celery read anywhere else."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from loadlab.exporters import celery_spans, otel_compat, traces_file

REPO = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("stack", "exporters", "loadtests", "reports", "dashboards", "loadlab")

# every private name of opentelemetry-sdk, opentelemetry-instrumentation-celery or Celery loadlab has used
PRIVATE_NAMES = {"_span_limits", "_span_processors", "_dict", "_set_items", "_root", "_remote_parent_sampled",
                 "_trace_before_publish", "_trace_after_publish", "_trace_prerun", "_trace_postrun", "_create_client",
                 "_status_code", "_instrumentation_scope", "_tracer", "_immutable", "_Span",
                 "_is_instrumented_by_opentelemetry", "attach_context", "retrieve_context", "detach_context",
                 "set_attributes_from_context", "retrieve_task_from_sender"}


@pytest.fixture
def fast_paths():
    was = otel_compat.fast_paths()
    yield otel_compat.use_fast_paths
    otel_compat.use_fast_paths(was)


def _tracer():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    return provider.get_tracer("loadlab.test")


def _accesses(path: Path) -> set[str]:
    """Private names read or written as attributes (``x._root``), looked up by name (``getattr(x, "_root")``) or
    imported (``from m import _Span``), and ``tuple.__new__``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            if node.attr in PRIVATE_NAMES:
                found.add(node.attr)
            if node.attr == "__new__" and isinstance(node.value, ast.Name) and node.value.id == "tuple":
                found.add("tuple.__new__")
        elif isinstance(node, ast.Constant) and node.value in PRIVATE_NAMES:
            found.add(node.value)
        elif isinstance(node, ast.ImportFrom):
            found |= {alias.name for alias in node.names if alias.name in PRIVATE_NAMES}
    return found


def test_only_the_compat_module_touches_private_names_of_the_tracing_libraries():
    compat = REPO / "exporters" / "otel_compat.py"
    offenders = {}
    for folder in SOURCE_FOLDERS:
        for path in (REPO / folder).rglob("*.py"):
            if path != compat and (names := _accesses(path)):
                offenders[str(path.relative_to(REPO))] = sorted(names)
    assert offenders == {}
    assert _accesses(compat) >= {"_span_limits", "_span_processors", "_Span", "tuple.__new__", "_create_client"}


def test_with_fast_paths_off_every_span_is_made_through_the_public_api(fast_paths):
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
    from opentelemetry.trace import SpanContext, TraceFlags

    fast_paths(False)
    tracer = _tracer()
    assert otel_compat.started_spans(tracer) is None and otel_compat.finished_spans(tracer) is None
    assert otel_compat.only_span_processor(tracer) is None and traces_file.span_writer_for(tracer) is None
    assert otel_compat.contrib_celery() is None and celery_spans.celery_instrumentor_class() is CeleryInstrumentor
    assert otel_compat.parent_based_delegate(ParentBased(ALWAYS_ON), "root") is None
    made = otel_compat.new_span_context()(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True, TraceFlags(1))
    assert type(made) is SpanContext and made.is_valid and made.is_remote

    fast_paths(True)  # the same calls, now the fast paths this installed version supports
    assert otel_compat.started_spans(tracer) is not None and otel_compat.finished_spans(tracer) is not None
    assert otel_compat.only_span_processor(tracer) is not None
    assert otel_compat.parent_based_delegate(ParentBased(ALWAYS_ON), "root") is ALWAYS_ON


def test_a_span_class_of_another_layout_falls_back_to_start_span(fast_paths, monkeypatch):
    from opentelemetry.sdk import trace as sdk_trace

    fast_paths(True)

    class SpanWithAnotherField(sdk_trace._Span):  # what a new SDK release keeping one more field per span looks like
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._new_field = None

    monkeypatch.setattr(sdk_trace, "_Span", SpanWithAnotherField)
    assert otel_compat.started_spans(_tracer()) is None


def test_contrib_celery_of_another_shape_is_used_as_published(fast_paths, monkeypatch):
    from opentelemetry.instrumentation.celery import CeleryInstrumentor, utils

    fast_paths(True)
    otel_compat._contrib_celery.cache_clear()
    try:
        assert otel_compat.contrib_celery() is not None  # this installed version: as probed
        monkeypatch.setattr(utils, "attach_context", lambda task, task_id, span: None)  # another signature
        otel_compat._contrib_celery.cache_clear()
        assert otel_compat.contrib_celery() is None
        assert celery_spans.celery_instrumentor_class() is CeleryInstrumentor
    finally:
        monkeypatch.undo()
        otel_compat._contrib_celery.cache_clear()


def test_the_switch_is_a_setting_every_process_reads():
    from loadlab.config.settings import Settings

    assert Settings.model_fields["otel_fast_paths"].default is True
    assert Settings.build(otel_fast_paths="false").otel_fast_paths is False
    assert Settings.build(otel_fast_paths="true").otel_fast_paths is True


def test_ci_runs_the_tracing_and_metrics_tests_at_the_lowest_versions_pyproject_allows():
    import re
    import tomllib

    pinned = dict(re.findall(r"^([a-z0-9-]+)==(\S+)$", (REPO / ".ci" / "lowest-versions.txt").read_text(), re.M))
    lower = {}
    for requirement in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        match = re.match(r"^([a-z0-9-]+)(?:\[[^\]]*\])?>=([^,;\s]+),<", requirement)
        if match and match.group(1) in pinned:
            lower[match.group(1)] = match.group(2)
    assert lower == pinned  # every pinned library has a tested upper bound and the pin is its lower bound
    assert "bash .ci/tracing-matrix" in (REPO / ".ci" / "run").read_text()
    assert "lowest-versions.txt" in (REPO / ".ci" / "tracing-matrix").read_text()
