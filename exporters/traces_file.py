"""``traces.jsonl``: finished spans as OTLP JSON lines (each line a ``TracesData`` with one span), written by every
process of a run to one file: the span processor, the file exporter and the span encoder.

Spans go here unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` names a collector (``loadlab.exporters.tracing``).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from pathlib import Path

from loadlab.exporters import otel_compat

log = logging.getLogger("loadlab.tracing")

TRACES_FILE = "traces.jsonl"


class JsonLinesSpanProcessor:
    """Span processor for ``traces.jsonl``: each finished span is encoded on the thread that ends it and the lines
    are appended in batches (``MAX_LINES`` or ``MAX_DELAY_S``, whichever first; the rest at flush and exit).

    Why not the SDK's BatchSpanProcessor: its export thread encodes hundreds of spans while holding the GIL, and
    every Redis reply the task thread waits for in the meantime must then wait for the GIL too (the convoy effect):
    measured, that made traced tasks markedly slower than the encoding itself. Here the only work off the task thread
    is a timer that writes already-encoded lines of a process gone idle."""

    MAX_LINES = 256
    MAX_DELAY_S = 1.0

    def __init__(self, exporter: "JsonLinesSpanExporter"):
        self.exporter = exporter
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self._first_at: float | None = None
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self._timer_pid: int | None = None
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._lines, self._first_at = [], None  # the parent's spans are the parent's to write
        self._stop = threading.Event()
        self._timer = None

    def on_start(self, span, parent_context=None) -> None:
        pass

    def _on_ending(self, span) -> None:
        pass

    def on_end(self, span) -> None:
        if span.context.trace_flags.sampled:
            self.add_line(self.exporter.line(span))

    def add_line(self, line: str) -> None:
        """One encoded span (``JsonLinesSpanExporter.line``) into the batch, written by this thread when the batch
        is full; a batch that grows old before (``MAX_DELAY_S``) is the timer's to write."""
        with self._lock:
            lines = self._lines
            lines.append(line)
            if self._first_at is None:
                self._first_at = time.monotonic()
                self._ensure_timer()
            if len(lines) < self.MAX_LINES:
                return
            self._lines, self._first_at = [], None
        self.exporter.write_lines(lines)

    def _ensure_timer(self) -> None:
        if self._timer is not None and self._timer_pid == os.getpid():
            return
        self._timer_pid = os.getpid()
        self._timer = threading.Thread(target=self._flush_stale, name="loadlab-traces-flush", daemon=True)
        self._timer.start()

    def _flush_stale(self) -> None:
        while not self._stop.wait(self.MAX_DELAY_S):
            with self._lock:
                stale = self._first_at is not None and time.monotonic() - self._first_at >= self.MAX_DELAY_S
                lines = self._lines if stale else None
                if stale:
                    self._lines, self._first_at = [], None
            if lines:
                self.exporter.write_lines(lines)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        with self._lock:
            lines, self._lines, self._first_at = self._lines, [], None
        if lines:
            self.exporter.write_lines(lines)
        return True

    def span_writer(self, resource, scope):
        """``write(context, parent, name, kind, start_ns, end_ns, attributes, status, events=(), links=())``: a span
        that loadlab made from its own fields, encoded and added to the batch without becoming a ``ReadableSpan``."""
        prefix, add_line = self.exporter.prefix(resource, scope), self.add_line

        def write(context, parent, name, kind, start_time, end_time, attributes, status, events=(), links=()):
            add_line(encode_span_line(prefix, context, parent, name, kind, start_time, end_time, attributes, status,
                                      events, links))

        return write

    def shutdown(self) -> None:
        self._stop.set()
        self.force_flush()
        self.exporter.shutdown()


class JsonLinesSpanExporter:
    """Finished spans as OTLP JSON lines (each line a ``TracesData`` with one span), appended to one file that
    several processes share: one ``write`` on an ``O_APPEND`` descriptor per batch, so lines never interleave."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None
        self._pid: int | None = None
        self._prefixes: dict[tuple[int, int], str] = {}

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked child opens its own
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._pid = os.getpid()
        return self._fd

    def export(self, spans):
        from opentelemetry.sdk.trace.export import SpanExportResult

        ok = self.write_lines([self.line(span) for span in spans])
        return SpanExportResult.SUCCESS if ok else SpanExportResult.FAILURE

    def write_lines(self, lines: list[str]) -> bool:
        """Appends encoded lines with one write (a batch of lines never interleaves with another process's)."""
        try:
            data = "".join(lines).encode("utf-8")
            fd = self._descriptor()
            written = os.write(fd, data)
            while written < len(data):  # only on a full disk or similar: finish the batch rather than lose it
                written += os.write(fd, data[written:])
        except Exception:  # noqa: BLE001 - a tracing failure must not break the task
            log.exception("could not write spans to %s", self.path)
            return False
        return True

    def prefix(self, resource, scope) -> str:
        """The start of a line up to its span: the resource and the instrumentation scope (the same for every span
        of a tracer, so encoded once per pair)."""
        key = (id(resource), id(scope))
        prefix = self._prefixes.get(key)
        if prefix is None:
            scope_json = {"name": scope.name, "version": scope.version or ""} if scope else {}
            prefix = self._prefixes[key] = (
                '{"resourceSpans":[{"resource":{"attributes":' + _attributes_json(resource.attributes)
                + '},"scopeSpans":[{"scope":' + json.dumps(scope_json, separators=(",", ":")) + ',"spans":[')
        return prefix

    def line(self, span) -> str:
        attributes, events, links = _span_collections(span)
        return encode_span_line(self.prefix(span.resource, span.instrumentation_scope), span.get_span_context(),
                                span.parent, span.name, span.kind, span.start_time, span.end_time, attributes,
                                span.status, events, links)

    def shutdown(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True  # every export is already written


def span_writer_for(tracer):
    """The traces.jsonl writer of the tracer's spans when loadlab's processor is the tracer's only one (``setup``
    adds no other): spans loadlab makes itself then skip the SDK's processor chain. None otherwise."""
    processor = otel_compat.only_span_processor(tracer)
    if not isinstance(processor, JsonLinesSpanProcessor):
        return None
    return processor.span_writer(tracer.resource, otel_compat.tracer_scope(tracer))


LINE_END = "]}]}]}\n"  # closes what ``JsonLinesSpanExporter.prefix`` opens
_KIND = {"INTERNAL": 1, "SERVER": 2, "CLIENT": 3, "PRODUCER": 4, "CONSUMER": 5}
_STATUS = {"UNSET": 0, "OK": 1, "ERROR": 2}
_quote = json.encoder.encode_basestring_ascii  # the C string encoder: most of a span is short strings
# one %-format for the whole span: a single C call instead of a list of parts (this runs for every span)
_SPAN_JSON = ('{"traceId":"%032x","spanId":"%016x"%s,"name":%s,"kind":%d,"startTimeUnixNano":"%d",'
              '"endTimeUnixNano":"%d","attributes":%s,"status":{"code":%d%s}%s%s}')


@functools.cache
def _enum_codes() -> tuple[dict, dict]:
    """OTLP's integers keyed by the ``id`` of the API's enum members, which are singletons: an enum member's hash
    and ``.name`` are Python-level calls, and this is looked up twice per span."""
    from opentelemetry.trace import SpanKind, StatusCode

    return ({id(kind): _KIND[kind.name] for kind in SpanKind}, {id(code): _STATUS[code.name] for code in StatusCode})


def encode_span_json(span) -> str:
    """One span in OTLP JSON (hex ids, integer enums, nanosecond times as strings), built as text: this runs for
    every span of every traced task, and json.dumps of nested dicts costs several times more."""
    attributes, events, links = _span_collections(span)
    return encode_span_fields(span.get_span_context(), span.parent, span.name, span.kind, span.start_time,
                              span.end_time, attributes, span.status, events, links)


_LINE_TEMPLATES: dict = {}  # (prefix, name, kind, parent?, attribute keys) -> a line's text around its fields
_MAX_LINE_TEMPLATES = 1024  # a process's spans come in a few shapes: publish, run and store of each task name
_IDS = '{"traceId":"%032x","spanId":"%016x"'
_IDS_AND_PARENT = _IDS + ',"parentSpanId":"%016x"'
_TIMES = '%d","endTimeUnixNano":"%d'


def encode_span_line(prefix: str, context, parent, name: str, kind, start_time: int, end_time: int, attributes,
                     status, events=(), links=()) -> str:
    """One line of traces.jsonl: ``prefix`` (``JsonLinesSpanExporter.prefix``), the span, ``LINE_END``.

    Most spans have the same shape as many before them: the same name, kind and attribute keys, string values, no
    events, links or status. Their line is the text of their shape, made once, joined with the ids, the times and
    the quoted values (one ``join``: a %-format scans its whole template, about 1 kB here, character by character)."""
    if attributes and not events and not links:
        kinds, codes = _enum_codes()
        values = tuple(attributes.values())
        if set(map(type, values)) == _STR_ONLY and codes.get(id(status.status_code)) == 0:  # UNSET: no message
            shape = (prefix, name, id(kind), parent is None, *attributes)
            template = _LINE_TEMPLATES.get(shape)
            if template is None:
                if len(_LINE_TEMPLATES) >= _MAX_LINE_TEMPLATES:
                    _LINE_TEMPLATES.clear()
                template = _LINE_TEMPLATES[shape] = _line_template(prefix, name, kinds.get(id(kind), 0),
                                                                   tuple(attributes))
            parts = list(template)
            parts[1::2] = (_IDS % (context[0], context[1]) if parent is None else
                           _IDS_AND_PARENT % (context[0], context[1], parent[1]),
                           _TIMES % (start_time, end_time), *map(_quote, values))
            return "".join(parts)
    return prefix + encode_span_fields(context, parent, name, kind, start_time, end_time, attributes, status, events,
                                       links) + LINE_END


def _line_template(prefix: str, name: str, kind_code: int, keys: tuple) -> tuple:
    """``encode_span_line``'s text of one shape, what ``_SPAN_JSON`` makes of it: the literal parts, with a None
    between each two where the ids, the times and each attribute's quoted value go."""
    parts = [prefix, None, ',"name":' + _quote(name) + ',"kind":' + str(kind_code) + ',"startTimeUnixNano":"', None,
             '","attributes":[']
    for index, key in enumerate(keys):
        parts[-1] += ("," if index else "") + '{"key":' + _quote(key) + ',"value":{"stringValue":'
        parts += [None, "}}"]
    parts[-1] += '],"status":{"code":0}}' + LINE_END
    return tuple(parts)


def encode_span_fields(context, parent, name: str, kind, start_time: int, end_time: int, attributes, status,
                       events=(), links=()) -> str:
    """``encode_span_json`` from a span's fields: spans that loadlab times itself are encoded without first being
    made into the SDK's ``ReadableSpan``."""
    kinds, codes = _enum_codes()
    return _SPAN_JSON % (
        context.trace_id, context.span_id,
        ',"parentSpanId":"%016x"' % parent.span_id if parent is not None else "",
        _quote(name), kinds.get(id(kind), 0), start_time, end_time,
        _attributes_json(attributes), codes.get(id(status.status_code), 0),
        ',"message":' + _quote(status.description) if status.description else "",
        ',"events":[' + ",".join(
            '{"name":' + _quote(e.name) + ',"timeUnixNano":"' + str(e.timestamp) + '","attributes":'
            + _attributes_json(e.attributes) + "}" for e in events) + "]" if events else "",
        ',"links":[' + ",".join(
            '{"traceId":"' + format(link.context.trace_id, "032x") + '","spanId":"'
            + format(link.context.span_id, "016x") + '","attributes":' + _attributes_json(link.attributes) + "}"
            for link in links) + "]" if links else "")


def _span_collections(span) -> tuple:
    """A finished span's attributes, events and links, through the SDK's public properties (the properties copy;
    the spans loadlab makes itself reach ``write_span`` without them)."""
    return span.attributes or {}, span.events, span.links


_FRAGMENTS: dict = {}       # (key, str value) -> encoded attribute: most values repeat (task names, states, hosts)
_MAX_FRAGMENTS = 4096       # unique values (message ids) pass through; the cache is emptied when full


_STR_ONLY = {str}


def _attributes_json(attributes) -> str:
    if not attributes:
        return "[]"
    fragments = _FRAGMENTS
    parts = []
    for item in attributes.items():
        if item[1].__class__ is not str:  # only strings: True, 1 and 1.0 are equal keys but encode differently
            parts.append(_attribute_json(*item))
            continue
        fragment = fragments.get(item)
        if fragment is None:
            fragment = _attribute_json(*item)
            if len(fragments) >= _MAX_FRAGMENTS:
                fragments.clear()
            fragments[item] = fragment
        parts.append(fragment)
    return "[" + ",".join(parts) + "]"


def _attribute_json(key, value) -> str:
    return '{"key":' + _quote(key) + ',"value":' + _any_value_json(value) + "}"


def _any_value_json(value) -> str:
    if isinstance(value, str):
        return '{"stringValue":' + _quote(value) + "}"
    if isinstance(value, bool):
        return '{"boolValue":' + ("true" if value else "false") + "}"
    if isinstance(value, int):
        return '{"intValue":"' + str(value) + '"}'
    if isinstance(value, float):
        return '{"doubleValue":' + (json.dumps(value) if value == value and abs(value) != float("inf")
                                     else '"' + str(value) + '"') + "}"
    if isinstance(value, (list, tuple)):
        return '{"arrayValue":{"values":[' + ",".join(_any_value_json(v) for v in value) + "]}}"
    return '{"stringValue":' + _quote(str(value)) + "}"
