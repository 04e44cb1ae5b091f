"""CI performance gates: pass/fail rules over the numbers in a run's ``report.json``.

Rules file
==========
A YAML file with a top-level ``gates:`` list. Each rule names a ``metric`` (a dotted path into ``report.json``;
list entries by number, e.g. ``serialization.0.wire_bytes``) and at least one check::

    gates:
      - metric: latency_ms.end_to_end.p95
        max: 250                      # fails when value > 250
      - metric: throughput.completed_per_s
        min: 200                      # fails when value < 200
      - name: p95 must not regress
        metric: latency_ms.end_to_end.p95
        max_regression: 10%           # or 0.10; needs --baseline RUN_DIR
        abs_floor: 5                  # optional, in the metric's unit (see below)
        direction: higher_is_worse    # optional, normally inferred (see below)

A rule with several checks (say ``min`` and ``max``) gives one result, and one JUnit test case, per check.
Unknown keys are errors, so a typo such as ``mx:`` cannot silently disable a gate. A metric whose value is
``null`` in the run (e.g. a p95 when no task completed) fails its gates rather than erroring: the run produced no
number, which is a result. A non-numeric value (a mapping, a string) is a configuration error.

Regression rules and the noise allowance
========================================
``max_regression`` compares the run against a baseline run. A value fails only when it is *worse* than the
baseline by more than::

    allowance = max(max_regression * |baseline|, abs_floor)

The floor exists because percentages of small numbers are noise: a p95 moving from 2 ms to 3 ms is "+50 %" but
is one scheduler hiccup. With a 10 % rule and the default 5 ms floor the allowance is max(0.2 ms, 5 ms) = 5 ms,
so 3 ms passes and the gate only fails above 7 ms. For large values the percentage dominates: a 250 ms baseline
allows 25 ms. The result's ``threshold`` is the worst value that still passes (baseline ± allowance).

Default ``abs_floor`` comes from the metric's unit, which the report's model declares for every figure
(``loadlab.reports.model``: the ``unit`` of each field in ``reports/schema/report.schema.json``):

================  ============================================================  ==============
unit              for example                                                   default floor
================  ============================================================  ==============
``ms``            ``latency_ms.end_to_end.p95``, ``scaling.points.0.p95_ms``    5.0 ms
``us``            ``serialization.0.encode_us.p95``                             50.0 µs
``s``             ``duration_s``, ``retries.backoff_observed_s.p95``            0.005 s
``/s``            ``throughput.completed_per_s``, ``locust.rps``                1.0 per second
``bytes``         ``serialization.0.wire_bytes``                                0
``count``         ``tasks.lost``, ``latency_ms.end_to_end.count``               0
``ratio``         ``littles_law.ratio``, USL parameters                         0
================  ============================================================  ==============

Counts get no floor on purpose: ``tasks.lost`` going from 0 to 1 is a real regression. Set ``abs_floor`` on a
rule to override the default.

Direction: lower is worse for rates (unit ``/s``) and for ``succeeded`` and ``requests`` (throughput); higher is
worse for everything else (latencies, lost, failed, retried, bytes, …).
``direction: higher_is_worse | lower_is_worse`` overrides the inference.

Errors
======
Every problem with the rules, the run directory or the baseline raises :class:`GateConfigError` with one
sentence naming the file or the rule position (the CLI exits 2 on it), and nothing is written.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from loadlab.reports.junit import JUnitCase, atomic_write_text, write_junit
from loadlab.reports.model import GateEntry, unit_of
from loadlab.reports.numbers import short_number
from loadlab.reports.report import REPORT_FILE, verdict_with_gates, version_problem

__all__ = [
    "GATE_SUITE",
    "GateConfigError",
    "GateResult",
    "Rule",
    "evaluate",
    "format_markdown",
    "gate_run_dir",
    "load_rules",
]

GATE_SUITE = "loadlab.gates"
JUNIT_FILE = "junit.xml"

Direction = Literal["higher_is_worse", "lower_is_worse"]
DIRECTIONS: tuple[str, ...] = ("higher_is_worse", "lower_is_worse")

_RULE_KEYS = ("metric", "name", "min", "max", "max_regression", "abs_floor", "direction")
_CHECK_KEYS = ("min", "max", "max_regression")

# Default abs_floor per unit; see the module docstring for the reasoning.
DEFAULT_ABS_FLOOR: dict[str, float] = {"ms": 5.0, "us": 50.0, "s": 0.005, "/s": 1.0, "bytes": 0.0, "count": 0.0,
                                       "ratio": 0.0, "": 0.0}
_UNIT_LABEL = {"ms": " ms", "us": " µs", "s": " s", "/s": "/s", "bytes": " B", "count": "", "ratio": "", "": ""}
_LOWER_IS_WORSE_NAMES = frozenset({"succeeded", "requests"})
# Boundary values must pass even when the allowance picks up float rounding (0.1 * 2.5 etc.).
_EPSILON = 1e-9
_MAX_LISTED_FIELDS = 20


class GateConfigError(ValueError):
    """A bad rules file, run directory or baseline: one plain sentence; the CLI maps it to exit code 2."""


# --------------------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """One entry of the ``gates:`` list. ``position`` is 1-based, as users count rules in error messages."""

    position: int
    metric: str
    min: float | None = None
    max: float | None = None
    max_regression: float | None = None  # a fraction: 0.10 means 10 %
    abs_floor: float | None = None  # explicit value only; see effective_abs_floor
    direction: Direction | None = None  # explicit value only; see effective_direction
    name: str | None = None

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.metric.split("."))

    @property
    def label(self) -> str:
        return _rule_label(self.position, self.metric)

    @property
    def unit(self) -> str:
        return _infer_unit(self.path)

    @property
    def effective_direction(self) -> Direction:
        return self.direction or _infer_direction(self.path)

    @property
    def effective_abs_floor(self) -> float:
        return self.abs_floor if self.abs_floor is not None else DEFAULT_ABS_FLOOR[self.unit]


def load_rules(path: str | os.PathLike[str]) -> list[Rule]:
    """Read and validate a gate rules file; raise GateConfigError on any problem."""
    source = Path(path)
    return _parse_rules(read_yaml(source, f"gate rules file '{source}'", GateConfigError), str(source))


def read_yaml(source: Path, subject: str, error: type[Exception], hint: str = "", loader=None) -> Any:
    """A YAML file loaded without duplicate keys; any problem raises ``error`` with one sentence starting with
    ``subject`` and ending with ``hint`` (what is accepted)."""
    def fail(problem: str):
        return error(f"{subject} {problem}{'; ' + hint if hint else ''}.")

    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise fail("does not exist") from None
    except IsADirectoryError:
        raise fail("is a directory, not a YAML file") from None
    except UnicodeDecodeError:
        raise fail("is not UTF-8 text") from None
    except OSError as exc:
        raise fail(f"cannot be read ({exc.strerror or exc})") from None
    try:
        return yaml.load(text, Loader=loader or StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise fail(f"is not valid YAML{where}: {exc.problem or exc.context or 'syntax error'}") from None
    except yaml.YAMLError as exc:
        raise fail(f"is not valid YAML: {exc}") from None


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys: two ``max:`` lines in one rule would otherwise keep only the last."""


def construct_strict_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may legitimately be overridden
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable key: construct_mapping reports it properly
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' in one mapping", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_strict_mapping)


def _parse_rules(data: Any, source: str) -> list[Rule]:
    if data is None:
        raise GateConfigError(f"gate rules file '{source}' is empty; it needs a top-level 'gates:' list.")
    if not isinstance(data, dict):
        raise GateConfigError(
            f"gate rules file '{source}' must be a mapping with a top-level 'gates:' list, not {_describe(data)}."
        )
    if "gates" not in data:
        keys = ", ".join(map(str, data)) or "none"
        raise GateConfigError(
            f"gate rules file '{source}' has no top-level 'gates:' list (its top-level keys are {keys})."
        )
    gates = data["gates"]
    if not isinstance(gates, list):
        raise GateConfigError(f"gate rules file '{source}': 'gates' must be a list of rules, not {_describe(gates)}.")
    if not gates:
        # An empty list would pass every run, which is almost certainly not what the author meant.
        raise GateConfigError(f"gate rules file '{source}': the 'gates' list is empty; add at least one rule.")
    return [_parse_rule(position, raw) for position, raw in enumerate(gates, start=1)]


def _parse_rule(position: int, raw: Any) -> Rule:
    if not isinstance(raw, dict):
        raise GateConfigError(
            f"gate rule {position}: expected a mapping with 'metric' and 'min', 'max' or 'max_regression', "
            f"found {_describe(raw)}."
        )
    metric = raw.get("metric")
    if not isinstance(metric, str) or not metric.strip():
        found = "no 'metric' key" if metric is None else f"'metric' set to {_describe(metric)}"
        raise GateConfigError(
            f"gate rule {position}: has {found}; set 'metric' to a dotted path into report.json "
            "such as latency_ms.end_to_end.p95."
        )
    metric = metric.strip()
    label = _rule_label(position, metric)
    if any(not part.strip() or part != part.strip() for part in metric.split(".")):
        raise GateConfigError(f"{label}: the path has an empty or space-padded part; write it like tasks.lost.")

    for key in raw:
        if key not in _RULE_KEYS:
            hint = _did_you_mean(str(key), _RULE_KEYS)
            raise GateConfigError(
                f"{label}: unknown key '{key}'{hint}; allowed keys are {', '.join(_RULE_KEYS)}."
            )
    if not any(raw.get(key) is not None for key in _CHECK_KEYS):
        raise GateConfigError(f"{label}: has none of 'min', 'max' or 'max_regression'; add at least one.")

    minimum = _optional_number(raw, "min", label)
    maximum = _optional_number(raw, "max", label)
    if minimum is not None and maximum is not None and minimum > maximum:
        raise GateConfigError(
            f"{label}: min {short_number(minimum)} is greater than max {short_number(maximum)}, so no value could pass."
        )
    regression = _parse_fraction(raw["max_regression"], label) if raw.get("max_regression") is not None else None

    abs_floor = _optional_number(raw, "abs_floor", label)
    if abs_floor is not None and abs_floor < 0:
        raise GateConfigError(f"{label}: abs_floor must be zero or positive, not {short_number(abs_floor)}.")
    direction = raw.get("direction")
    if direction is not None and direction not in DIRECTIONS:
        raise GateConfigError(
            f"{label}: direction must be higher_is_worse or lower_is_worse, not {_describe(direction)}."
        )
    # These two only shape the regression check; accepting them elsewhere would hide a misplaced key.
    for key, value in (("abs_floor", abs_floor), ("direction", direction)):
        if value is not None and regression is None:
            raise GateConfigError(f"{label}: '{key}' only applies to max_regression, which this rule does not set.")

    name = raw.get("name")
    if name is not None and not isinstance(name, str):
        raise GateConfigError(f"{label}: name must be text, not {_describe(name)}.")

    return Rule(
        position=position,
        metric=metric,
        min=minimum,
        max=maximum,
        max_regression=regression,
        abs_floor=abs_floor,
        direction=direction,
        name=name.strip() if name and name.strip() else None,
    )


def _optional_number(raw: dict[Any, Any], key: str, label: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GateConfigError(f"{label}: '{key}' must be a finite number, not {_describe(value)}.")
    return float(value)


_PERCENT_RE = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*%$")


def _parse_fraction(value: Any, label: str) -> float:
    """``"10%"`` or ``0.10`` -> 0.10. A bare number above 1 is rejected: ``10`` could mean 10 % or 1000 %."""
    bad = GateConfigError(
        f"{label}: max_regression {_describe(value)} is not a percentage like '10%' or a fraction like 0.10."
    )
    if isinstance(value, bool):
        raise bad
    if isinstance(value, str):
        text = value.strip()
        match = _PERCENT_RE.match(text)
        if match:
            return float(match.group(1)) / 100.0
        try:
            value = float(text)
        except ValueError:
            raise bad from None
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise bad
    if value > 1:
        raise GateConfigError(
            f"{label}: max_regression {short_number(float(value))} is ambiguous; a bare number is a fraction (0.10 = 10%), "
            f"so write '{short_number(float(value))}%' if you meant a percentage."
        )
    return float(value)


def _infer_unit(path: Sequence[str]) -> str:
    """The unit the report's model declares for the figure at ``path`` ('' for a path it does not declare)."""
    return unit_of(tuple(path)) or ""


def _infer_direction(path: Sequence[str]) -> Direction:
    last = next((part for part in reversed(path) if not part.isdigit()), path[-1])
    if _infer_unit(path) == "/s" or last in _LOWER_IS_WORSE_NAMES:
        return "lower_is_worse"
    return "higher_is_worse"


# --------------------------------------------------------------------------------------------------- evaluation


# The verdict of one check of one rule: an entry of report.json's ``gates`` list, as the report's model has it.
GateResult = GateEntry


def evaluate(report: dict[str, Any], rules: Iterable[Rule], baseline: dict[str, Any] | None = None) -> list[GateResult]:
    """Check every rule against ``report`` (and ``baseline`` for regressions).

    Raises GateConfigError for a path that is not in the report, a non-numeric value, or a regression rule
    without a baseline, before returning anything, so callers never act on a partial verdict.
    """
    results: list[GateResult] = []
    for rule in rules:
        value = _metric_value(report, rule, "report.json", allow_null=True)
        if rule.min is not None:
            results.append(_check_bound(rule, value, rule.min, "min"))
        if rule.max is not None:
            results.append(_check_bound(rule, value, rule.max, "max"))
        if rule.max_regression is not None:
            if baseline is None:
                raise GateConfigError(
                    f"{rule.label}: max_regression needs a baseline run; pass --baseline RUN_DIR or remove the rule."
                )
            base = _metric_value(baseline, rule, "the baseline report.json", allow_null=False)
            assert base is not None  # allow_null=False guarantees it
            results.append(_check_regression(rule, value, base))
    return results


def _metric_value(doc: dict[str, Any], rule: Rule, doc_name: str, *, allow_null: bool) -> float | None:
    raw = _resolve(doc, rule.path, rule.label, doc_name)
    if raw is None:
        if allow_null:
            return None
        raise GateConfigError(f"{rule.label}: the value in {doc_name} is null, so there is nothing to compare against.")
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        hint = ""
        if isinstance(raw, dict) and raw:
            hint = f"; pick one of its fields: {_field_list(raw)}"
        elif isinstance(raw, list) and raw:
            hint = f"; pick an entry by index, 0 to {len(raw) - 1}"
        raise GateConfigError(f"{rule.label}: the value in {doc_name} is {_describe(raw)}, not a number{hint}.")
    return float(raw)


def _resolve(doc: Any, path: Sequence[str], label: str, doc_name: str) -> Any:
    node = doc
    for depth, part in enumerate(path):
        parent = ".".join(path[:depth])
        if isinstance(node, dict):
            if part not in node:
                suggestion = _did_you_mean(part, [str(key) for key in node], prefix=f"{parent}." if parent else "")
                if not node:
                    available = f"'{parent}' is empty" if parent else "the document is empty"
                elif parent:
                    available = f"available fields under '{parent}' are {_field_list(node)}"
                else:
                    available = f"available top-level fields are {_field_list(node)}"
                raise GateConfigError(f"{label}: no such field in {doc_name}{suggestion}; {available}.")
            node = node[part]
        elif isinstance(node, list):
            if not part.isdigit():
                raise GateConfigError(
                    f"{label}: '{parent}' in {doc_name} is a list, so the next path part must be an index "
                    f"such as {parent}.0, not '{part}'."
                )
            index = int(part)
            if index >= len(node):
                entries = "1 entry" if len(node) == 1 else f"{len(node)} entries"
                size = "is empty" if not node else f"has only {entries} (0 to {len(node) - 1})"
                raise GateConfigError(f"{label}: no such entry in {doc_name}; '{parent}' {size}.")
            node = node[index]
        else:
            raise GateConfigError(
                f"{label}: no such field in {doc_name}; '{parent}' is {_describe(node)}, which has no fields."
            )
    return node


def _check_bound(rule: Rule, value: float | None, bound: float, kind: Literal["min", "max"]) -> GateResult:
    op, fail_op = (">=", "<") if kind == "min" else ("<=", ">")
    unit = _UNIT_LABEL[rule.unit]
    if value is None or math.isnan(value):
        passed = False
        message = f"{rule.metric} has no value ({short_number(value)}) in report.json; {kind} {short_number(bound)}{unit}"
    else:
        passed = value >= bound if kind == "min" else value <= bound
        shown_op = op if passed else fail_op
        message = f"{rule.metric} {short_number(value)}{unit} {shown_op} {kind} {short_number(bound)}{unit}"
    return GateResult(
        rule=_rule_text(rule, f"{rule.metric} {op} {short_number(bound)}"),
        metric=rule.metric,
        value=value,
        threshold=bound,
        passed=passed,
        message=message,
    )


def _check_regression(rule: Rule, value: float | None, base: float) -> GateResult:
    assert rule.max_regression is not None
    higher_is_worse = rule.effective_direction == "higher_is_worse"
    floor = rule.effective_abs_floor
    allowance = max(rule.max_regression * abs(base), floor)
    threshold = base + allowance if higher_is_worse else base - allowance
    unit = _UNIT_LABEL[rule.unit]
    percent = f"{short_number(rule.max_regression * 100)}%"
    how = (
        f"baseline {short_number(base)}{unit} {'+' if higher_is_worse else '-'} allowance {short_number(allowance)}{unit} "
        f"= max({percent} of baseline, floor {short_number(floor)}{unit})"
    )
    rule_text = _rule_text(rule, f"{rule.metric} regression <= {percent} vs baseline")

    if value is None or math.isnan(value):
        return GateResult(
            rule=rule_text,
            metric=rule.metric,
            value=value,
            threshold=threshold,
            passed=False,
            baseline=base,
            message=f"{rule.metric} has no value ({short_number(value)}) in report.json; limit {short_number(threshold)}{unit} ({how})",
        )
    worse_by = value - base if higher_is_worse else base - value
    passed = worse_by <= allowance + _EPSILON * max(1.0, abs(base))
    change = f"{(value - base) / abs(base) * 100:+.1f}% vs baseline" if base else f"{value - base:+g} vs baseline 0"
    if passed:
        message = f"{rule.metric} {short_number(value)}{unit} within limit {short_number(threshold)}{unit} ({how}); {change}"
    else:
        op = ">" if higher_is_worse else "<"
        message = f"{rule.metric} {short_number(value)}{unit} {op} limit {short_number(threshold)}{unit} ({how}); {change}"
    return GateResult(
        rule=rule_text,
        metric=rule.metric,
        value=value,
        threshold=threshold,
        passed=passed,
        baseline=base,
        message=message,
    )


# --------------------------------------------------------------------------------------------------- run directories


def gate_run_dir(
    run_dir: str | os.PathLike[str],
    rules_path: str | os.PathLike[str],
    baseline_dir: str | os.PathLike[str] | None = None,
    console: Console | None = None,
) -> int:
    """Gate a finished run: print a table, write junit.xml, store results in report.json; 0 pass, 1 fail.

    Everything that can be wrong with the inputs is checked before the first write, so a GateConfigError
    leaves the run directory untouched.
    """
    rules = load_rules(rules_path)
    run = Path(run_dir)
    report_path = _report_path(run, "run directory")
    report = _load_report(report_path)
    baseline = _load_report(_report_path(Path(baseline_dir), "baseline")) if baseline_dir is not None else None
    results = evaluate(report, rules, baseline)

    out = console if console is not None else Console()
    _print_results(out, results)

    write_junit(run / JUNIT_FILE, _junit_cases(results), GATE_SUITE)
    report["gates"] = [result.as_report_entry() for result in results]
    report["verdict"] = verdict_with_gates(report.get("verdict", {}), report["gates"])
    atomic_write_text(report_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return 0 if all(result.passed for result in results) else 1


def _report_path(path: Path, role: str) -> Path:
    """A run directory, or (for baselines, handy with downloaded CI artifacts) a report.json file itself."""
    if not path.exists():
        raise GateConfigError(f"{role} '{path}' does not exist.")
    if path.is_file():
        if role == "baseline":
            return path
        raise GateConfigError(f"{role} '{path}' is a file; pass the run directory that holds {REPORT_FILE}.")
    report_path = path / REPORT_FILE
    if not report_path.is_file():
        raise GateConfigError(
            f"{role} '{path}' has no {REPORT_FILE}; was the run interrupted before it finished writing?"
        )
    return report_path


def _load_report(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise GateConfigError(
            f"'{path}' is not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}."
        ) from None
    except UnicodeDecodeError:
        raise GateConfigError(f"'{path}' is not UTF-8 text.") from None
    except OSError as exc:
        raise GateConfigError(f"cannot read '{path}': {exc.strerror or exc}.") from None
    if not isinstance(data, dict):
        raise GateConfigError(f"'{path}' must hold a JSON object, not {_describe(data)}.")
    problem = version_problem(data, path)
    if problem:
        raise GateConfigError(problem)
    return data


def _print_results(console: Console, results: Sequence[GateResult]) -> None:
    table = Table(title="Gates", title_justify="left")
    table.add_column("rule")
    table.add_column("value", justify="right")
    table.add_column("threshold", justify="right")
    table.add_column("baseline", justify="right")
    table.add_column("verdict", justify="center")
    for result in results:
        verdict = Text("PASS", style="bold green") if result.passed else Text("FAIL", style="bold red")
        # Text(), not str: rule names are user input and must not be parsed as Rich markup.
        table.add_row(
            Text(result.rule),
            Text(short_number(result.value)),
            Text(short_number(result.threshold)),
            Text(short_number(result.baseline)),
            verdict,
        )
    console.print(table)
    failed = [result for result in results if not result.passed]
    for result in failed:
        console.print(Text(f"FAIL {result.message}", style="red"))
    summary = f"{len(results) - len(failed)}/{len(results)} gates passed"
    console.print(Text(summary, style="bold red" if failed else "bold green"))


def _junit_cases(results: Sequence[GateResult]) -> list[JUnitCase]:
    cases = []
    for result in results:
        details = "\n".join(
            [
                f"metric: {result.metric}",
                f"value: {short_number(result.value)}",
                f"threshold: {short_number(result.threshold)}",
                f"baseline: {short_number(result.baseline)}",
                result.message,
            ]
        )
        cases.append(
            JUnitCase(
                name=result.rule,
                classname=GATE_SUITE,
                failure_message=None if result.passed else result.message,
                failure_text=None if result.passed else details,
                system_out=result.message if result.passed else None,
            )
        )
    return cases


def format_markdown(results: Sequence[GateResult]) -> str:
    """A ``## Gates`` section (verdict line + table + failure reasons) for summary.md / a PR comment."""
    lines = ["## Gates", ""]
    if not results:
        return "\n".join([*lines, "No gates were evaluated.", ""])
    failed = [result for result in results if not result.passed]
    if failed:
        lines.append(f"**{len(failed)} of {len(results)} gates failed.**")
    else:
        lines.append(f"**All {len(results)} gates passed.**")
    lines += ["", "| | Rule | Value | Threshold | Baseline |", "|---|---|---:|---:|---:|"]
    for result in results:
        verdict = "✅ pass" if result.passed else "❌ **fail**"
        rule = f"`{_md_code(result.rule)}`"
        cells = [verdict, rule, short_number(result.value), short_number(result.threshold), short_number(result.baseline)]
        lines.append("| " + " | ".join(_md_cell(cell) for cell in cells) + " |")
    if failed:
        lines += ["", "Why they failed:", ""]
        lines += [f"- {_md_text(result.message)}" for result in failed]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- helpers


def _rule_label(position: int, metric: str) -> str:
    return f"gate rule {position} (metric '{metric}')"


def _rule_text(rule: Rule, expression: str) -> str:
    return f"{rule.name}: {expression}" if rule.name else expression


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the text '{value}'"
    if isinstance(value, (int, float)):
        return f"the number {short_number(float(value))}"
    return f"a {type(value).__name__}"


def _field_list(mapping: dict[Any, Any]) -> str:
    keys = sorted(str(key) for key in mapping)
    if len(keys) > _MAX_LISTED_FIELDS:
        return ", ".join(keys[:_MAX_LISTED_FIELDS]) + f", … ({len(keys) - _MAX_LISTED_FIELDS} more)"
    return ", ".join(keys)


def _did_you_mean(word: str, candidates: Iterable[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{match[0]}'?)" if match else ""


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_text(text: str) -> str:
    # Outside code spans, "<name>" in a user's rule name would be swallowed as an HTML tag.
    return _md_cell(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _md_code(text: str) -> str:
    return text.replace("`", "'")
