"""``loadlab dashboards render RUN_DIR`` (issue 6, item 4): every panel of every dashboard drawn from the Prometheus
data of a real ``loadlab run --prometheus`` (tests/prometheus_runs.py), into self-contained HTML pages.

Without ``prometheus`` installed the tests skip, or fail under ``LOADLAB_REQUIRE_SERVICES=1`` (CI).
"""
from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from loadlab.dashboards.queries import DASHBOARDS
from tests.conftest import processes_mentioning, run_cli
from tests.prometheus_runs import recorded_run


class Panels(HTMLParser):
    """The ``<section class="panel">`` elements of a page: their data-* attributes and whether an <svg> is inside."""

    def __init__(self):
        super().__init__()
        self.panels: list[dict] = []
        self.external: list[str] = []
        self._in_panel = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section" and "panel" in (attrs.get("class") or "").split():
            self.panels.append({**attrs, "svg": False, "paths": 0})
            self._in_panel = True
        elif tag == "svg" and self._in_panel:
            self.panels[-1]["svg"] = True
        elif tag == "path" and self._in_panel:
            self.panels[-1]["paths"] += 1
        for name in ("src", "href"):
            value = attrs.get(name) or ""
            if value.startswith(("http:", "https:", "//")):
                self.external.append(value)
        if tag in ("script", "link", "img", "iframe"):
            self.external.append(f"<{tag}>")

    def handle_endtag(self, tag):
        if tag == "section":
            self._in_panel = False


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    run_dir = recorded_run(tmp_path_factory)
    before = snapshot(run_dir / "prometheus")
    proc = run_cli("dashboards", "render", str(run_dir), "--strict", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not processes_mentioning(str(run_dir)), "the render's Prometheus outlived the command"
    assert snapshot(run_dir / "prometheus") == before, "render changed the run's Prometheus data"
    return run_dir, proc


def snapshot(directory) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_every_panel_of_every_dashboard_is_drawn_with_data(rendered):
    run_dir, proc = rendered
    out = run_dir / "dashboards"
    assert (out / "index.html").is_file()
    for spec in DASHBOARDS:
        page = out / f"{spec.uid}.html"
        assert page.is_file(), proc.stdout
        parser = Panels()
        parser.feed(page.read_text(encoding="utf-8"))
        assert not parser.external, f"{page.name} is not self-contained: {parser.external}"
        drawn = {p["data-title"]: p for p in parser.panels}
        assert list(drawn) == [panel.title for panel in spec.panels], page.name
        for title, panel in drawn.items():
            where = f"{spec.uid}: {title!r}"
            assert panel["svg"] and panel["paths"] > 0, f"{where} has no plot"
            assert int(panel["data-series"]) >= 1, f"{where} has no series"
            assert int(panel["data-points"]) >= 5, f"{where} has only {panel['data-points']} samples"
        assert f"{len(spec.panels)}/{len(spec.panels)} panels with data" in proc.stdout


def test_pages_carry_the_queries_and_the_legends(rendered):
    run_dir, _proc = rendered
    text = (run_dir / "dashboards" / "celery-task-drilldown.html").read_text(encoding="utf-8")
    # the task variable's values of the run, and per-task legends ({{task}}) filled in from the series' labels
    assert re.search(r"\$task</code> = All \([^)]*loadlab\.noop", text)
    assert ">loadlab.noop<" in text
    # the expanded query of each panel is on the page (Grafana variables replaced)
    assert "rate(celery_task_succeeded_total{task=~&quot;.+&quot;}[" in text
    assert "$__rate_interval" not in text.split("</header>", 1)[1]


def test_render_without_prometheus_data_is_a_usage_error(tmp_path):
    proc = run_cli("dashboards", "render", str(tmp_path), timeout=60)
    assert proc.returncode == 2
    assert "loadlab run --prometheus" in proc.stdout + proc.stderr


def test_run_with_prometheus_but_no_binary_is_a_usage_error(tmp_path):
    from pathlib import Path

    from tests.conftest import LOADLAB

    proc = run_cli("run", "smoke", "--prometheus", "--out", str(tmp_path / "run"), timeout=60,
                   env={"PATH": str(Path(LOADLAB).parent)})  # the venv only: no prometheus on PATH
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "apt-get install prometheus" in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "logs").exists(), "the stack started although the run could not be recorded"
