"""The end of a run, one way for ``loadlab run`` and for each swarm of the web UI: drain → reconcile → audit the
result backend → build → write → render.

The caller stops the load and marks it stopped on the recorder (``Recorder.mark_load_stopped``), then calls
``drain()``; what it must do while the stack still runs (a last queue sample, the final scrape, Locust's final
tables) goes between ``drain()`` and ``write()``."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from loadlab.config.settings import Settings
from loadlab.reports.backend_audit import audit_backend
from loadlab.reports.recorder import AUDITED_MAX, Recorder
from loadlab.reports.render import write_rendered
from loadlab.reports.report import REPORT_FILE, build_report, write_json
from loadlab.stack.tasks import declared_retry_policies, retry_policy


class RunSession:
    def __init__(self, settings: Settings, recorder: Recorder, app, report_dir: Path, scenario: str):
        self.settings = settings
        self.recorder = recorder
        self.app = app  # for the result backend's word on tasks the ledger never saw finish; None: not asked
        self.report_dir = report_dir
        self.scenario = scenario
        self.drained: bool | None = None

    def drain(self, tick: Callable[[int], None] | None = None, timeout_s: float | None = None) -> bool:
        """Waits until every submitted task is terminal or the drain deadline (``timeout_s``, else the settings'
        drain timeout); past the deadline, asks the result backend about the tasks still pending."""
        self.drained = False  # until the drain ends: an interrupted drain did not complete
        self.drained = self.recorder.drain(self.settings.drain_timeout_s if timeout_s is None else timeout_s,
                                           tick=tick)
        if not self.drained and self.app is not None:
            self.recorder.reconcile(self.app)
        return self.drained

    def write(self, *, started_at: float, locust: dict, extra: dict,
              render: Callable[[Path, dict], None] = write_rendered) -> dict:
        """Builds the report from what the recorder holds, writes ``report.json`` and renders the pages
        (``render``: the web UI renders in a native thread, so its event loop goes on meanwhile)."""
        if self.drained is None:
            raise RuntimeError("RunSession.write() before drain(): the report would count tasks still in flight")
        if not self.recorder.closed:
            self.recorder.close()
        audit = None
        if self.app is not None:  # while the stack still runs: the backend may be the stack's own embedded Redis
            audit = audit_backend(self.app, self.recorder.terminal_log,
                                  truncated=len(self.recorder.terminal_log) >= AUDITED_MAX)
        # the app's own tasks' policies (a user's app declares its own); without the app, the reference flaky's
        policies = declared_retry_policies(self.app) if self.app is not None else None
        policy = (next(iter(policies.values())) if len(policies) == 1 else {}) if policies is not None else \
            retry_policy(self.settings)
        report = build_report(scenario=self.scenario, settings_masked=self.settings.masked(), started_at=started_at,
                              load_stopped_at=self.recorder.load_stopped_at, recorded=self.recorder.summary(),
                              locust=locust, retry_policy=policy, retry_policies=policies, drained=self.drained,
                              extra={"backend_audit": audit, **extra})
        self.report_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.report_dir / REPORT_FILE, report)
        render(self.report_dir, report)
        return report
