"""``loadlab dashboards build|check|render``: Grafana dashboards and alert rules kept as code, and their review."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from loadlab.cli.common import EXIT_FAILED, UsageError, console, err_console


@click.group()
def dashboards():
    """Grafana dashboards and alert rules kept as code."""


@dashboards.command("build")
def dashboards_build():
    """Regenerate the committed dashboard JSON from the Python definitions."""
    from loadlab.dashboards.build import build

    for path in build():
        console.print(f"wrote {path}")


@dashboards.command("check")
def dashboards_check():
    """Fail (exit 1) when the committed JSON is stale or a query does not parse."""
    from loadlab.dashboards.build import PromtoolMissing, check

    try:
        problems = check()
    except PromtoolMissing as exc:
        raise UsageError(str(exc)) from None
    for problem in problems:
        err_console.print(f"[red]✗[/] {problem}")
    if problems:
        sys.exit(EXIT_FAILED)
    console.print("dashboards and alert rules are up to date and every query parses")


@dashboards.command("render")
@click.argument("run_dir")
@click.option("--out", default=None, help="Directory for the pages (default RUN_DIR/dashboards/)")
@click.option("--strict", is_flag=True, help="Exit 1 when a panel has no data or a query fails")
def dashboards_render(run_dir, out, strict):
    """Draw every dashboard panel from the Prometheus data of a `loadlab run --prometheus` run, as self-contained
    HTML pages (RUN_DIR/dashboards/<uid>.html), for review without Grafana."""
    from loadlab.dashboards.render import render_run
    from loadlab.stack.prometheus import PrometheusError, PrometheusMissing, StoredRunError

    try:
        with console.status("rendering dashboards from the run's Prometheus data…") as status:
            rendered = render_run(Path(run_dir), Path(out) if out else None,
                                  progress=lambda title: status.update(f"rendering {title}…"))
    except (StoredRunError, PrometheusMissing) as exc:
        raise UsageError(str(exc)) from None
    except PrometheusError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        sys.exit(EXIT_FAILED)
    for uid, path in rendered.pages.items():
        panels = rendered.panels[uid]
        console.print(f"wrote {path}  ({sum(1 for p in panels if p.points)}/{len(panels)} panels with data)")
    for uid, title in rendered.empty:
        err_console.print(f"[yellow]no data:[/] {uid}: {title}")
    for error in rendered.errors:
        err_console.print(f"[red]query failed:[/] {error}")
    console.print(f"index: {rendered.index}")
    if strict and (rendered.empty or rendered.errors):
        sys.exit(EXIT_FAILED)
