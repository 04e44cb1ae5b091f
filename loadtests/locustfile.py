"""The locustfile for the plain ``locust`` command against a running stack (``loadlab up`` prints the variables):

    LOADLAB_BROKER=redis://127.0.0.1:PORT/0 LOADLAB_API_URL=http://127.0.0.1:PORT locust -f loadtests/locustfile.py

Settings come from ``LOADLAB_*`` variables (``LOADLAB_SCENARIO`` picks the scenario). When ``LOADLAB_LEDGER_URL``
is set, the master (or the single local process) follows the run's ledger and fires ``end_to_end`` requests; with
``LOADLAB_RUN_DIR`` too, it drains and writes the run's report there when Locust quits (as docker-compose.yml's
Locust services do under tests/engine/compose.engine.yml).
"""
import time
from pathlib import Path

from locust import events
from locust.runners import WorkerRunner

from loadlab.config.settings import Settings
from loadlab.exporters import loadgen_metrics
from loadlab.loadtests.runner import completion_listener
from loadlab.loadtests.scenarios import get_scenario
from loadlab.loadtests.user_locustfile import locustfile_shape, run_user_classes

settings = Settings.from_env()
scenario = get_scenario(settings.scenario)
for _user_class in run_user_classes(settings, scenario):  # the scenario's, or those of LOADLAB_LOCUSTFILE
    globals()[_user_class.__name__] = _user_class  # Locust discovers module-level User classes
del _user_class  # else Locust finds the last class twice
_shape = locustfile_shape(settings)  # the LOADLAB_LOCUSTFILE's own load shape, found by Locust here
if _shape is not None:
    globals()[type(_shape).__name__] = type(_shape)
_recorder = None
_app = None
_monitor = None
_started_at = None


@events.init.add_listener
def _serve_metrics(environment, **_):
    """Every Locust process (master, workers, a single local one) serves its producer metrics with ``--metrics on``:
    what it sent and its encode cost; the one following the ledger adds end-to-end latency and tasks in flight.
    The compose file's Prometheus scrapes them on LOADLAB_METRICS_PORT."""
    loadgen_metrics.serve(settings, register=not isinstance(environment.runner, WorkerRunner))


@events.init.add_listener
def _celery_tab(environment, web_ui=None, **_):
    """With the web UI and a broker to watch, the same Celery tab as ``loadlab ui`` (task numbers need the ledger)."""
    global _monitor
    if web_ui is None or not settings.broker:
        return
    from loadlab.loadtests.webui import CeleryMonitor, install_celery_tab

    _monitor = CeleryMonitor(settings).start()
    install_celery_tab(environment, lambda: _recorder, _monitor)


def _result_app():
    """The run's app as the report reads it (each task's retry limit and policy; the result backend for tasks the
    ledger did not see finish). It publishes no ledger records."""
    global _app
    if _app is None:
        from loadlab.stack.app import make_app

        _app = make_app(settings.model_copy(update={"ledger_url": None}))
    return _app


@events.test_start.add_listener
def _follow_ledger(environment, **_):
    global _recorder, _started_at
    _started_at = time.time()
    if settings.ledger_url and not isinstance(environment.runner, WorkerRunner) and _recorder is None:
        from loadlab.reports.recorder import Recorder
        from loadlab.stack.tasks import retry_limits

        _recorder = Recorder(settings.ledger_url, settings.run_id, max_retries=retry_limits(_result_app()),
                             on_completion=loadgen_metrics.observe_completions(
                                 settings, completion_listener(environment))).start()
        loadgen_metrics.serve(settings, _recorder)


@events.quitting.add_listener
def _stop_following(environment, **_):
    if _monitor is not None:
        _monitor.stop()
    if _recorder is not None:
        _recorder.close()


@events.quitting.add_listener  # after _stop_following in the file: quitting listeners fire in reverse, so before it
def _write_report(environment, **_):
    """Locust quits (a headless run's end): drain, then report.json (and its pages) in LOADLAB_RUN_DIR, as ``loadlab
    run`` writes it. Not at test_stop: a master's Locust workers go on sending until they are told to quit."""
    if _recorder is None or not settings.run_dir or _recorder.closed:
        return
    from loadlab.loadtests.runner import locust_section
    from loadlab.reports.session import RunSession
    _recorder.mark_load_stopped(time.time())
    # the result backend answers for tasks the ledger did not see finish; this app publishes no ledger records
    session = RunSession(settings, _recorder, _result_app(), Path(settings.run_dir), scenario.name)
    session.drain()
    session.write(started_at=_started_at, locust=locust_section(environment), extra={})
