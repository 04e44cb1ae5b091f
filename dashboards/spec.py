"""Plain data describing a dashboard: titles, PromQL and presentation hints.

Each dashboard module (``celery_overview``, ``task_drilldown``, ``load_test``) declares one ``DashboardSpec`` that holds
every PromQL expression of that dashboard, so tests and tools (``queries.all_queries()``, the static renderer
``render``) can enumerate the queries without parsing Grafana JSON. ``grafana.py`` turns a spec into a dashboard with
the grafana-foundation-sdk; nothing else needs to know the SDK.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

PanelKind = Literal["timeseries", "stat"]

# Grafana's built-in rate window: at least four scrape intervals, so rate() never sees fewer than two samples.
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Target:
    """One query of a panel; ``legend`` is Grafana's legend template (``{{task}}``)."""

    expr: str
    legend: str = ""


@dataclass(frozen=True)
class PanelSpec:
    title: str
    targets: tuple[Target, ...]
    description: str = ""
    kind: PanelKind = "timeseries"
    unit: str = "short"
    width: int = 12
    height: int = 8
    min: float | None = 0
    max: float | None = None
    # refIds (A, B, ...) drawn against a second, right-hand axis with their own unit: "latency against load".
    right_axis: tuple[str, ...] = ()
    right_unit: str = "short"
    # Stat panels: (value, colour) steps; the first step's value is ignored (it is the base colour).
    thresholds: tuple[tuple[float | None, str], ...] = ()


@dataclass(frozen=True)
class VariableSpec:
    """A Prometheus query variable. ``query`` is Grafana's ``label_values(metric, label)`` form; ``promql`` is the
    equivalent PromQL so the variable's source can be checked like any other query."""

    name: str
    label: str
    query: str
    promql: str
    multi: bool = True
    include_all: bool = True
    # With "All" selected Grafana substitutes this regex instead of a long alternation of every value.
    all_value: str = ".+"


@dataclass(frozen=True)
class DashboardSpec:
    uid: str
    title: str
    description: str
    panels: tuple[PanelSpec, ...]
    tags: tuple[str, ...] = ("loadlab", "celery")
    variables: tuple[VariableSpec, ...] = field(default=())
    time_from: str = "now-30m"
    refresh: str = "10s"


def quantiles(metric: str, qs: tuple[float, ...], by: str = "", selector: str = "") -> tuple[Target, ...]:
    """``histogram_quantile`` targets for a ``*_bucket`` series, one per quantile, aggregated ``by (le, <by>)``.

    Aggregating the bucket rates before the quantile is what makes the result correct across workers and pool children.
    """
    group = f"le, {by}" if by else "le"
    legend_prefix = "".join(f"{{{{{label.strip()}}}}} " for label in by.split(",") if label.strip())
    return tuple(
        Target(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{selector}[{RATE}])))",
            f"{legend_prefix}p{round(q * 100):d}",
        )
        for q in qs
    )
