"""Dashboards without Grafana: every panel of every dashboard drawn as a static plot from a run's Prometheus data.

``loadlab dashboards render RUN_DIR`` serves the TSDB that ``loadlab run --prometheus`` kept in ``RUN_DIR/prometheus/``
(``loadlab.stack.prometheus.open_run``: a copy, read-only for the run directory), evaluates each panel's queries over the
run's time range with ``/api/v1/query_range`` — the same expressions as the committed dashboards, Grafana variables
replaced as Grafana would (``$__rate_interval`` = max(4 × scrape interval, step + scrape interval), template
variables = All) — and writes ``RUN_DIR/dashboards/<uid>.html`` per dashboard plus ``index.html``: self-contained
pages (inline SVG, no script, no network) laid out on Grafana's 24-column grid, so a reviewer sees in a pull request
what the dashboards show on a real run.

Time series panels draw one line per series with Grafana's legend templates (``{{task}} p95``) and a right-hand axis
for the panel's ``right_axis`` queries; stat panels show the last value (coloured by the panel's thresholds) over a
sparkline. The load phase (from ``report.json``) is shaded. Each panel element carries ``data-series`` (series with
a sample) and ``data-points`` (finite samples drawn), so a check can tell a panel with data from an empty one.
"""
from __future__ import annotations

import html
import io
import json
import math
import re
import string
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from loadlab.reports.report import REPORT_FILE
from loadlab.stack.prometheus import Prometheus, StoredRun, open_run

from .queries import DASHBOARDS, expand
from .spec import DashboardSpec, PanelSpec

REF_IDS = string.ascii_uppercase  # Grafana's refIds, in target order (as dashboards/grafana.py assigns them)
MAX_POINTS = 400                  # per series: the step grows with the run's length
_LEGEND_VAR = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_LABEL_VALUES = re.compile(r"^\s*label_values\(.*,\s*(\w+)\s*\)\s*$")
COLOURS = ("#7eb26d", "#eab839", "#6ed0e0", "#ef843c", "#e24d42", "#1f78c1", "#ba43a9", "#705da0", "#508642",
           "#cca300", "#447ebc", "#c15c17")  # Grafana's classic palette
GRAFANA_COLOURS = {"green": "#73bf69", "red": "#f2495c", "orange": "#ff9830", "yellow": "#fade2a", "blue": "#5794f2",
                   "purple": "#b877d9"}


@dataclass
class Series:
    ref: str
    legend: str
    times: list[float]
    values: list[float]

    @property
    def points(self) -> int:
        return sum(1 for v in self.values if math.isfinite(v))


@dataclass
class PanelResult:
    panel: PanelSpec
    series: list[Series] = field(default_factory=list)
    queries: list[tuple[str, str, str]] = field(default_factory=list)  # (refId, expanded expr, legend)
    errors: list[str] = field(default_factory=list)

    @property
    def points(self) -> int:
        return sum(s.points for s in self.series)


@dataclass
class Rendered:
    pages: dict[str, Path]                          # uid -> page
    index: Path
    empty: list[tuple[str, str]]                    # (uid, panel title) without a single finite sample
    panels: dict[str, list[PanelResult]]

    @property
    def errors(self) -> list[str]:
        """Queries Prometheus refused, as ``uid: title: refId: error``."""
        return [f"{uid}: {r.panel.title}: {e}" for uid, results in self.panels.items() for r in results
                for e in r.errors]


# --- querying --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    start: float
    end: float
    step: float
    rate_interval: str
    range_: str

    @classmethod
    def of(cls, stored: StoredRun) -> "Window":
        span = stored.end - stored.start
        scrape = stored.scrape_interval_s
        step = max(scrape, math.ceil(span / MAX_POINTS))
        rate = max(4 * scrape, step + scrape)  # what Grafana's $__rate_interval resolves to
        return cls(stored.start, stored.end, step, f"{rate:g}s", f"{math.ceil(span):d}s")


def legend_for(template: str, labels: dict[str, str]) -> str:
    if template and template != "__auto":
        return _LEGEND_VAR.sub(lambda m: labels.get(m.group(1), ""), template).strip()
    shown = {k: v for k, v in labels.items() if k != "__name__"}
    if not shown:
        return labels.get("__name__", "")
    return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(shown.items())) + "}"


def query_panel(prometheus: Prometheus, panel: PanelSpec, window: Window, variables: dict[str, str]) -> PanelResult:
    result = PanelResult(panel)
    for ref, target in zip(REF_IDS, panel.targets):
        expr = expand(target.expr, rate_interval=window.rate_interval, range_=window.range_, **variables)
        result.queries.append((ref, expr, target.legend))
        try:
            data = prometheus.query_range(expr, window.start, window.end, window.step)
        except Exception as exc:  # noqa: BLE001 - one failing query is shown on its panel, the others still drawn
            result.errors.append(f"{ref}: {exc}")
            continue
        for item in data.get("result", []):
            times = [float(t) for t, _v in item["values"]]
            values = [float(v) for _t, v in item["values"]]
            result.series.append(Series(ref, legend_for(target.legend, item["metric"]), times, values))
    return result


def variable_values(prometheus: Prometheus, spec: DashboardSpec, window: Window) -> dict[str, list[str]]:
    """The values each template variable offers over the run (its PromQL's label values), for the page header."""
    out: dict[str, list[str]] = {}
    for var in spec.variables:
        match = _LABEL_VALUES.match(var.query)
        label = match.group(1) if match else var.name
        try:
            data = prometheus.query_range(var.promql, window.start, window.end, window.step)
            out[var.name] = sorted({s["metric"].get(label, "") for s in data.get("result", [])} - {""})
        except Exception:  # noqa: BLE001 - the header then says "none"; the panels are what matters
            out[var.name] = []
    return out


# --- units -----------------------------------------------------------------------------------------------------------
def unit_scale(unit: str, peak: float) -> tuple[float, str]:
    """(factor, axis label) so values × factor read well in the panel's Grafana unit."""
    peak = abs(peak) if math.isfinite(peak) else 0.0
    if unit == "s":
        if 0 < peak < 1e-3:
            return 1e6, "µs"
        if 0 < peak < 1:
            return 1e3, "ms"
        return 1.0, "s"
    if unit == "percentunit":
        return 100.0, "%"
    if unit in ("bytes", "Bps"):
        suffix = "/s" if unit == "Bps" else ""
        for factor, name in ((1 / 1024 ** 3, "GiB"), (1 / 1024 ** 2, "MiB"), (1 / 1024, "KiB")):
            if peak * factor >= 1:
                return factor, name + suffix
        return 1.0, "B" + suffix
    if unit == "ops":
        return 1.0, "ops/s"
    return 1.0, ""


def format_value(value: float, unit: str) -> str:
    if not math.isfinite(value):
        return "no value" if math.isnan(value) else str(value)
    factor, label = unit_scale(unit, value)
    scaled = value * factor
    text = f"{scaled:.3g}" if abs(scaled) < 1000 else f"{scaled:,.0f}"
    return f"{text} {label}".strip() if label != "%" else f"{text}%"


# --- drawing ---------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _svg(fig, salt: str) -> str:
    import matplotlib

    buffer = io.StringIO()
    # unique, stable element ids per figure: several inline SVGs on one page must not share clip-path ids
    with matplotlib.rc_context({"svg.hashsalt": salt, "svg.fonttype": "none"}):
        fig.savefig(buffer, format="svg", bbox_inches="tight",
                    metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    _pyplot().close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _peak(series: list[Series]) -> float:
    finite = [abs(v) for s in series for v in s.values if math.isfinite(v)]
    return max(finite) if finite else 0.0


def _dates(times: list[float]):
    return [datetime.fromtimestamp(t, tz=timezone.utc) for t in times]


def _time_axis(ax, window: Window, load: tuple[float, float] | None) -> None:
    import matplotlib.dates as mdates

    ax.set_xlim(*_dates([window.start, window.end]))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=timezone.utc))
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=3, maxticks=7, tz=timezone.utc))
    if load is not None:
        ax.axvspan(*_dates(list(load)), color="#1f78c1", alpha=0.06, lw=0, label="_load")
    ax.tick_params(labelsize=7, colors="#444")
    ax.grid(True, color="#e5e5e5", lw=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def plot_timeseries(result: PanelResult, window: Window, load, salt: str) -> str:
    plt = _pyplot()
    panel = result.panel
    fig, ax = plt.subplots(figsize=(max(3.2, panel.width / 24 * 12.5), panel.height / 8 * 2.8), dpi=100)
    _time_axis(ax, window, load)
    left = [s for s in result.series if s.ref not in panel.right_axis]
    right = [s for s in result.series if s.ref in panel.right_axis]
    handles = []
    colour = iter(COLOURS * 10)
    for axis, group, unit in ((ax, left, panel.unit), (None, right, panel.right_unit)):
        if not group:
            continue
        if axis is None:
            axis = ax.twinx()
            axis.tick_params(labelsize=7, colors="#444")
            for side in ("top", "left"):
                axis.spines[side].set_visible(False)
        factor, label = unit_scale(unit, _peak(group))
        for s in group:
            if not s.points:
                continue  # a series with no sample in the run (e.g. a serializer never used): nothing to draw
            style = "--" if axis is not ax else "-"
            (line,) = axis.plot(_dates(s.times), [v * factor for v in s.values], style, lw=1.3, color=next(colour),
                                label=s.legend or s.ref)
            handles.append(line)
        if label:
            axis.set_ylabel(label, fontsize=7, color="#444")
        if axis is ax:
            bottom = panel.min if panel.min is not None else None
            top = panel.max * factor if panel.max is not None else None
            if bottom is not None or top is not None:
                lo, hi = ax.get_ylim()
                ax.set_ylim(bottom if bottom is not None else lo, top if top is not None else max(hi, 1e-9))
        else:
            axis.set_ylim(bottom=0)
    if not result.points:
        ax.text(0.5, 0.5, "No data", transform=ax.transAxes, ha="center", va="center", fontsize=12, color="#888")
    if handles:
        ax.legend(handles=handles, fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(0, -0.12),
                  ncol=min(4, len(handles)), handlelength=1.6, columnspacing=1.2)
    return _svg(fig, salt)


def _threshold_colour(panel: PanelSpec, value: float) -> str:
    steps = panel.thresholds or ((None, "green"),)
    colour = steps[0][1]
    for bound, name in steps[1:]:
        if bound is not None and math.isfinite(value) and value >= bound:
            colour = name
    return GRAFANA_COLOURS.get(colour, colour)


def last_value(result: PanelResult) -> float:
    """Grafana's "last (not null)" reduction of the first series with a finite sample."""
    for s in result.series:
        finite = [v for v in s.values if math.isfinite(v)]
        if finite:
            return finite[-1]
    return float("nan")


def plot_stat(result: PanelResult, window: Window, load, salt: str) -> str:
    plt = _pyplot()
    panel = result.panel
    value = last_value(result)
    colour = _threshold_colour(panel, value) if panel.thresholds else "#5794f2"
    fig, ax = plt.subplots(figsize=(max(3.2, panel.width / 24 * 12.5), panel.height / 8 * 2.8), dpi=100)
    for s in result.series[:1]:
        ax.fill_between(_dates(s.times), [v if math.isfinite(v) else 0 for v in s.values], color=colour, alpha=0.18,
                        lw=0)
        ax.plot(_dates(s.times), s.values, color=colour, lw=1.2)
    _time_axis(ax, window, load)
    # the sparkline keeps to the lower part of the panel, under the value
    ax.set_ylim(0, max(_peak(result.series[:1]) * 2.2, 1e-9))
    ax.grid(False)
    ax.set_yticks([])
    ax.set_xticks([])  # a sparkline, as Grafana draws it: the time axis is the page's
    for side in ("left", "bottom"):
        ax.spines[side].set_visible(False)
    ax.text(0.5, 0.55, format_value(value, panel.unit) if result.points else "No data", transform=ax.transAxes,
            ha="center", va="center", fontsize=26, fontweight="bold", color=colour if result.points else "#888")
    return _svg(fig, salt)


# --- pages -----------------------------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f4f5f5;color:#1f1f20}
header{background:#fff;border-bottom:1px solid #ddd;padding:12px 20px}
header h1{font-size:20px;margin:0 0 4px} header p{margin:2px 0;color:#555;font-size:13px}
nav a{margin-right:14px;font-size:13px} nav a.current{font-weight:bold;color:#1f1f20;text-decoration:none}
main{display:grid;grid-template-columns:repeat(24,1fr);gap:8px;padding:10px}
.panel{background:#fff;border:1px solid #dcdcdc;border-radius:3px;padding:6px 8px;min-width:0}
.panel h2{font-size:13px;margin:0 0 2px} .panel p.desc{font-size:11px;color:#666;margin:0 0 4px}
.panel svg{width:100%;height:auto;display:block} .panel.empty{border-color:#e0a0a0}
.panel details{font-size:11px;color:#555} .panel pre{white-space:pre-wrap;word-break:break-all;margin:4px 0}
.error{color:#c4162a;font-size:11px} code{font-size:12px}
"""


def _load_span(run_dir: Path) -> tuple[float, float] | None:
    try:
        report = json.loads((run_dir / REPORT_FILE).read_text(encoding="utf-8"))
        start = datetime.fromisoformat(report["started_at"].replace("Z", "+00:00")).timestamp()
        return start, start + float(report["duration_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _scenario(run_dir: Path) -> str:
    try:
        return str(json.loads((run_dir / REPORT_FILE).read_text(encoding="utf-8")).get("scenario") or "")
    except (OSError, ValueError):
        return ""


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def panel_html(result: PanelResult, svg: str, uid: str) -> str:
    panel = result.panel
    esc = html.escape
    queries = "\n".join(f"{ref}: {expr}" + (f"    [legend {legend}]" if legend else "")
                        + ("    (right axis)" if ref in panel.right_axis else "")
                        for ref, expr, legend in result.queries)
    errors = "".join(f'<p class="error">{esc(e)}</p>' for e in result.errors)
    classes = "panel" if result.points else "panel empty"
    return (f'<section class="{classes}" style="grid-column:span {min(24, max(1, panel.width))}" '
            f'data-dashboard="{esc(uid)}" data-title="{esc(panel.title)}" data-kind="{esc(panel.kind)}" '
            f'data-series="{sum(1 for s in result.series if s.points)}" data-points="{result.points}">'
            f"<h2>{esc(panel.title)}</h2>"
            + (f'<p class="desc">{esc(panel.description)}</p>' if panel.description else "")
            + svg + errors
            + f"<details><summary>queries</summary><pre>{esc(queries)}</pre></details></section>")


def page_html(spec: DashboardSpec, body: str, header_lines: list[str], nav: str) -> str:
    esc = html.escape
    header = "".join(f"<p>{line}</p>" for line in header_lines)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(spec.title)} — loadlab</title>'
            f"<style>{CSS}</style></head><body><header><nav>{nav}</nav><h1>{esc(spec.title)}</h1>"
            f"<p>{esc(spec.description)}</p>{header}</header><main>{body}</main></body></html>\n")


def render_run(run_dir: Path, out_dir: Path | None = None, *, progress: Callable[[str], None] | None = None,
               dashboards: tuple[DashboardSpec, ...] = DASHBOARDS) -> Rendered:
    """Draw every panel of ``dashboards`` from the Prometheus data of ``run_dir``; write the pages and return them.

    Raises StoredRunError (no usable ``RUN_DIR/prometheus/``), PrometheusMissing, PrometheusError.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "dashboards"
    load = _load_span(run_dir)
    scenario = _scenario(run_dir)
    pages: dict[str, Path] = {}
    empty: list[tuple[str, str]] = []
    all_results: dict[str, list[PanelResult]] = {}
    esc = html.escape
    with open_run(run_dir) as (prometheus, stored):
        out_dir.mkdir(parents=True, exist_ok=True)
        window = Window.of(stored)
        for spec in dashboards:
            if progress:
                progress(spec.title)
            values = variable_values(prometheus, spec, window)
            variables = {var.name: var.all_value for var in spec.variables}
            results = [query_panel(prometheus, panel, window, variables) for panel in spec.panels]
            all_results[spec.uid] = results
            sections = []
            for index, result in enumerate(results):
                draw = plot_stat if result.panel.kind == "stat" else plot_timeseries
                svg = draw(result, window, load, salt=f"{spec.uid}-{index}")
                sections.append(panel_html(result, svg, spec.uid))
                if not result.points:
                    empty.append((spec.uid, result.panel.title))
            header = [
                f"Run <code>{esc(str(run_dir))}</code>" + (f" — scenario <b>{esc(scenario)}</b>" if scenario else ""),
                f"{esc(_utc(window.start))} → {esc(_utc(window.end))} ({window.end - window.start:.0f} s); "
                f"scrape interval {stored.scrape_interval_s:g} s, step {window.step:g} s, "
                f"<code>$__rate_interval</code> = {esc(window.rate_interval)}"
                + ("; the load phase is shaded" if load else ""),
            ]
            for var in spec.variables:
                offered = ", ".join(values.get(var.name) or []) or "none"
                header.append(f"Variable <code>${esc(var.name)}</code> = All ({esc(offered)})")
            header.append("Rendered from the run's Prometheus data by <code>loadlab dashboards render</code>; "
                          "the queries are those of the committed Grafana dashboards.")
            nav = " ".join(
                f'<a href="{esc(s.uid)}.html"' + (' class="current"' if s.uid == spec.uid else "")
                + f">{esc(s.title)}</a>"
                for s in dashboards) + ' <a href="index.html">index</a>'
            path = out_dir / f"{spec.uid}.html"
            path.write_text(page_html(spec, "".join(sections), header, nav), encoding="utf-8")
            pages[spec.uid] = path
    index = out_dir / "index.html"
    rows = "".join(
        f'<tr><td><a href="{esc(uid)}.html">{esc(spec.title)}</a></td><td>{len(all_results[uid])}</td>'
        f"<td>{sum(1 for r in all_results[uid] if r.points)}</td></tr>"
        for spec in dashboards for uid in [spec.uid])
    index.write_text(
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>loadlab dashboards</title>'
        f"<style>{CSS} table{{border-collapse:collapse;margin:16px 20px}} td,th{{padding:4px 12px;"
        f"border-bottom:1px solid #ddd;text-align:left}}</style></head><body><header><h1>Dashboards of "
        f"{esc(str(run_dir))}</h1><p>{esc(_utc(window.start))} → {esc(_utc(window.end))}</p></header>"
        f"<table><tr><th>dashboard</th><th>panels</th><th>with data</th></tr>{rows}</table></body></html>\n",
        encoding="utf-8")
    return Rendered(pages, index, empty, all_results)
