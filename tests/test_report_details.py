"""Details of the report a reader trips on: each with the case that showed it."""
from __future__ import annotations

from loadlab.reports import render


def _row(t, completed, p95, depth=None, failed=0.0):
    return {"t_s": t, "width_s": 1.0, "submitted_per_s": completed, "completed_per_s": completed,
            "failed_per_s": failed, "retried_per_s": 0.0, "in_system": 1, "queue_depth": depth,
            "end_to_end_p50_ms": p95 / 2, "end_to_end_p95_ms": p95}


def test_the_drains_few_stragglers_draw_no_latency_spike():
    rows = [_row(0, 80, 40), _row(1, 82, 45), _row(2, 3, 3000)]  # the last second: three retried tasks
    assert [p95 for _, _, p95 in render.latency_points(rows)] == [40, 45]
    assert render.latency_points([_row(0, 9, 100), _row(1, 10, 100)]) == [(1, 50.0, 100)]


def test_the_queue_panel_states_the_same_peak_as_its_caption():
    # the broker was sampled at 4 mid-bucket, but each bucket draws its last sample (0 and 1)
    rows = [_row(0, 50, 40, depth=0), _row(1, 50, 40, depth=1)]
    svg = render.timeseries_plot(rows, queue="celery", queue_peak=4)
    assert "peak 4 (each bucket's last sample drawn: up to 1)" in svg
    assert "peak 1 · after the drain 1" in render.timeseries_plot(rows, queue="celery", queue_peak=1)


def test_fewer_publish_samples_and_backoff_observations_are_explained():
    report = {"tasks": {"submitted": 2333, "retried": 61},
              "latency_ms": {"publish": {"count": 2329}}}
    assert "publish has 2,329 samples for 2,333 tasks submitted" in render._sample_counts_note(report)
    report["latency_ms"]["publish"]["count"] = 2333
    assert render._sample_counts_note(report) == ""
    retries = {"backoff_by_retry_s": {"1": {"count": 40}, "2": {"count": 17}}}
    assert "57 backoff observations for 61 retries" in render._backoff_count_note(retries, report["tasks"])
    assert render._backoff_count_note(retries, {"retried": 57}) == ""


def test_the_reference_mixs_designed_failures_leave_a_healthy_run_passing():
    from loadlab.reports.report import verdict

    tasks = {"submitted": 230, "lost": 0, "failed": 2}
    designed = {"task": "loadlab.flaky", "exception": "FlakyError", "attempts": 4}
    healthy = verdict(tasks, True, [designed, designed])
    assert healthy["status"] == "pass" and healthy["problems"] == []
    assert "2 flaky task(s) used up their retries" in healthy["notes"][0]
    # any other failure is the run's problem, and so is one that could not be told apart (not listed)
    other = verdict(tasks, True, [designed, {"task": "loadlab.cpu", "exception": "ValueError", "attempts": 1}])
    assert other["status"] == "warn" and other["problems"] == ["1 task(s) failed for good"]
    assert verdict(tasks, True, [designed])["problems"] == ["1 task(s) failed for good"]
