"""Every PromQL expression loadlab ships, in one list: dashboard panels, dashboard variables and alert rules.

``all_queries()`` is what checks enumerate: ``dashboards check`` parses each with promtool, and a live test can evaluate
each against a Prometheus that scraped a real run. Grafana's own variables (``$__rate_interval``, ``$task`` ...) are
replaced by plain values first, so every returned expression is PromQL that Prometheus itself accepts.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from . import celery_overview, load_test, task_drilldown
from .spec import DashboardSpec

DASHBOARDS: tuple[DashboardSpec, ...] = (celery_overview.SPEC, task_drilldown.SPEC, load_test.SPEC)

ALERTS_DIR = Path(__file__).resolve().parent / "alerts"
RULES_FILE = ALERTS_DIR / "celery.rules.yml"
RULES_TEST_FILE = ALERTS_DIR / "celery.rules.test.yml"
# The "dashboard uid" under which alert rules are listed by all_queries().
RULES_UID = "alerts:celery.rules"

_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


class Query(NamedTuple):
    uid: str  # dashboard uid, or RULES_UID for an alert rule
    title: str  # panel title, "variable <name>", or the alert name
    expr: str


def expand(expr: str, *, rate_interval: str = "1m", range_: str = "5m", **variables: str) -> str:
    """Replace Grafana variables by values Prometheus accepts.

    Template variables default to ``.+`` (what "All" selects; every use is a ``=~`` matcher). Raises ``ValueError``
    naming an unknown variable, so a typo in a dashboard is caught by the check rather than shipped.
    """
    builtins = {"__rate_interval": rate_interval, "__interval": rate_interval, "__range": range_}
    template_vars = {v.name: variables.get(v.name, ".+") for d in DASHBOARDS for v in d.variables}

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in variables:
            return variables[name]
        if name in builtins:
            return builtins[name]
        if name in template_vars:
            return template_vars[name]
        raise ValueError(f"unknown Grafana variable ${name} in {expr!r}")

    return _VARIABLE.sub(substitute, expr)


def alert_rules(path: Path = RULES_FILE) -> list[dict[str, Any]]:
    """The alerting rules of a Prometheus rule file (recording rules are skipped)."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return [rule for group in doc.get("groups", []) for rule in group.get("rules", []) if "alert" in rule]


def dashboard_queries(raw: bool = False) -> list[Query]:
    out: list[Query] = []
    for spec in DASHBOARDS:
        for var in spec.variables:
            out.append(Query(spec.uid, f"variable {var.name}", var.promql))
        for panel in spec.panels:
            for target in panel.targets:
                out.append(Query(spec.uid, panel.title, target.expr if raw else expand(target.expr)))
    return out


def all_queries(raw: bool = False) -> list[Query]:
    """``(dashboard_uid, panel_title, expr)`` for every query of every dashboard and every alert rule.

    ``raw=True`` keeps Grafana variables as written in the dashboards (e.g. to compare with the JSON).
    """
    rules = [Query(RULES_UID, str(rule["alert"]), str(rule["expr"]).strip()) for rule in alert_rules()]
    return dashboard_queries(raw) + rules
