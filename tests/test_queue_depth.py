"""The broker's queue depth over time: a real run whose queue builds (more 5 ms cpu tasks than one worker with one
pool process can take) and drains, sampled from the embedded Redis broker while the run goes on."""
import json
import re

import jsonschema
import pytest

from loadlab.reports.report import SCHEMA_PATH
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def backlog_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("queue-depth") / "run"
    # 20 users × 20 tasks/s of 5 ms cpu against one pool process (≤ 200/s at best): the queue must build
    result = run_cli("run", "saturate", "--duration", "3s", "--users", "20", "--workers", "1", "--concurrency", "1",
                     "--drain-timeout-s", "60", "--out", str(out), timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, json.loads((out / "report.json").read_text())


def test_queue_depth_builds_during_the_load_and_is_zero_after_the_drain(backlog_run):
    _, report = backlog_run
    jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()))
    assert report["tasks"]["lost"] == 0 and report["drain"]["completed"]
    rows = report["timeseries"]
    assert rows and all("queue_depth" in r and "in_system" in r for r in rows)
    stopped = report["timeseries_load_stopped_s"]
    during_load = [r["queue_depth"] for r in rows if r["t_s"] < stopped and r["queue_depth"] is not None]
    assert during_load and max(during_load) > 0, rows
    sampled = [r["queue_depth"] for r in rows if r["queue_depth"] is not None]
    assert sampled[-1] == 0, rows  # the last sample is taken after the drain
    sampling = report["queue_depth_sampling"]
    assert sampling["queue"] == "celery" and sampling["transport"] == "redis" and sampling["statistic"] == "last"
    assert sampling["errors"] == 0 and sampling["last"] == 0 and sampling["peak"] >= max(sampled)
    # about one sample a second over the load and the drain, each in a bucket of its own unless two fell in one
    # bucket, which shows its last: the sample taken before the first task and the last one after the drain share
    # a bucket with a neighbour, and on a busy machine (tests run two at a time) the sampler's greenlet wakes late,
    # so a late sample and the next one can share one too. Half of them in buckets of their own is the floor.
    span = rows[-1]["t_s"] + rows[-1]["width_s"]
    assert span - 2 <= sampling["samples"] <= span + 2
    assert sampling["samples"] // 2 <= len(sampled) <= sampling["samples"]
    if len(sampled) == sampling["samples"]:  # then the peak is one of the values drawn
        assert sampling["peak"] == max(sampled)


def test_queue_depth_and_in_system_are_different_quantities(backlog_run):
    _, report = backlog_run
    rows = report["timeseries"]
    # the ledger's in-system count includes what a worker prefetched or runs; the broker's queue holds only what is
    # still waiting there. While the backlog is large the two are close, at the end the queue is empty first.
    assert max(r["in_system"] for r in rows) > 0
    assert any(r["queue_depth"] is not None and r["queue_depth"] != r["in_system"] for r in rows)


def test_report_html_draws_the_queue_depth_panel(backlog_run):
    out, _ = backlog_run
    html = (out / "report.html").read_text()
    over_time = html[html.index("<h2>Over time</h2>"):]
    svg = over_time[over_time.index("<svg"):over_time.index("</svg>")]
    # matplotlib keeps each text of a plot as a comment next to its glyph paths
    assert "<!-- broker queue depth: ready messages in 'celery'" in svg
    assert re.search(r"<!-- peak [1-9][\d,]*[^>]* · after the drain 0 -->", svg)
    assert "in system: sent, not yet finished" in svg
