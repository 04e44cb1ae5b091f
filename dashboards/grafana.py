"""Turn a ``DashboardSpec`` into Grafana dashboard JSON with the grafana-foundation-sdk.

The SDK's builders give typed, schema-shaped panels; this module is the only one that imports it.
"""
from __future__ import annotations

import json
import string
from typing import Any

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash_b
from grafana_foundation_sdk.builders import prometheus as prom_b
from grafana_foundation_sdk.builders import stat as stat_b
from grafana_foundation_sdk.builders import timeseries as ts_b
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_m
from grafana_foundation_sdk.models import dashboard as dash_m

from .spec import DashboardSpec, PanelSpec, VariableSpec

# A datasource variable instead of a fixed uid: the dashboards then work in any Grafana with a Prometheus datasource,
# not only in the provisioned one (whose uid is "prometheus", the variable's default).
DATASOURCE_VAR = "datasource"
DATASOURCE = dash_m.DataSourceRef(type_val="prometheus", uid=f"${{{DATASOURCE_VAR}}}")
REF_IDS = string.ascii_uppercase


def _targets(panel: PanelSpec) -> list[cogbuilder.Builder[cogvariants.Dataquery]]:
    if len(panel.targets) > len(REF_IDS):
        raise ValueError(f"panel {panel.title!r} has more than {len(REF_IDS)} queries")
    return [
        prom_b.Dataquery().expr(t.expr).legend_format(t.legend or "__auto").ref_id(ref).range()
        for t, ref in zip(panel.targets, REF_IDS)
    ]


def _thresholds(panel: PanelSpec) -> dash_b.ThresholdsConfig:
    steps = panel.thresholds or ((None, "green"),)
    return dash_b.ThresholdsConfig().mode(dash_m.ThresholdsMode.ABSOLUTE).steps(
        [dash_m.Threshold(value=None if i == 0 else value, color=color) for i, (value, color) in enumerate(steps)]
    )


def _panel(panel: PanelSpec, panel_id: int) -> ts_b.Panel | stat_b.Panel:
    built: ts_b.Panel | stat_b.Panel
    if panel.kind == "stat":
        built = (
            stat_b.Panel()
            .graph_mode(common_m.BigValueGraphMode.AREA)
            .color_mode(common_m.BigValueColorMode.VALUE)
            .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        )
    else:
        built = (
            ts_b.Panel()
            .line_width(1)
            .fill_opacity(10)
            .legend(
                common_b.VizLegendOptions()
                .display_mode(common_m.LegendDisplayMode.TABLE)
                .placement(common_m.LegendPlacement.BOTTOM)
                .show_legend(True)
                .calcs(["mean", "max", "lastNotNull"])
            )
            .tooltip(common_b.VizTooltipOptions().mode(common_m.TooltipDisplayMode.MULTI).sort(common_m.SortOrder.DESCENDING))
        )
        for ref in panel.right_axis:
            built = built.override_by_query(ref, [
                dash_m.DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
                dash_m.DynamicConfigValue(id_val="unit", value=panel.right_unit),
            ])
    built = (
        built.id(panel_id)
        .title(panel.title)
        .datasource(DATASOURCE)
        .unit(panel.unit)
        .span(panel.width)
        .height(panel.height)
        .thresholds(_thresholds(panel))
        .targets(_targets(panel))
    )
    if panel.description:
        built = built.description(panel.description)
    if panel.min is not None:
        built = built.min(panel.min)
    if panel.max is not None:
        built = built.max(panel.max)
    return built


def _variable(var: VariableSpec) -> dash_b.QueryVariable:
    return (
        dash_b.QueryVariable(var.name)
        .label(var.label)
        .datasource(DATASOURCE)
        .query(var.query)
        .refresh(dash_m.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dash_m.VariableSort.ALPHABETICAL_ASC)
        .multi(var.multi)
        .include_all(var.include_all)
        .all_value(var.all_value)
    )


def build_dashboard(spec: DashboardSpec) -> dash_b.Dashboard:
    board = (
        dash_b.Dashboard(spec.title)
        .uid(spec.uid)
        .description(spec.description)
        .tags(list(spec.tags))
        .editable()
        .tooltip(dash_m.DashboardCursorSync.CROSSHAIR)
        .time(spec.time_from, "now")
        .refresh(spec.refresh)
        .timezone("browser")
        .with_variable(dash_b.DatasourceVariable(DATASOURCE_VAR).label("Data source").type("prometheus"))
    )
    for var in spec.variables:
        board = board.with_variable(_variable(var))
    for panel_id, panel in enumerate(spec.panels, start=1):
        board = board.with_panel(_panel(panel, panel_id))
    return board


def to_dict(spec: DashboardSpec) -> dict[str, Any]:
    """The dashboard as Grafana JSON (a plain dict, the form Grafana's file provisioning reads)."""
    result: dict[str, Any] = json.loads(json.dumps(build_dashboard(spec).build(), cls=JSONEncoder))
    return result


def to_json(spec: DashboardSpec) -> str:
    """Stable text for the committed file: sorted keys and a trailing newline keep diffs to real changes."""
    return json.dumps(to_dict(spec), indent=2, sort_keys=True) + "\n"
