"""Result waits under gevent (as in Locust) return on the pinned Celery version, from many greenlets at once."""
import subprocess
import sys
import textwrap

from loadlab.config.settings import Settings
from loadlab.stack.supervisor import Stack
from tests.conftest import unique


def test_async_result_get_returns_under_gevent(run_dir):
    settings = Settings.build(run_id=unique())
    with Stack(settings, run_dir, api=False) as stack:
        script = textwrap.dedent("""
            from gevent import monkey; monkey.patch_all()
            import gevent, sys
            from loadlab.stack.app import make_app
            from loadlab.config.settings import Settings
            app = make_app(Settings.from_env())
            results = [app.send_task("loadlab.io", kwargs={"ms": 20}) for _ in range(30)]
            jobs = [gevent.spawn(r.get, timeout=20) for r in results]
            gevent.joinall(jobs, timeout=30)
            values = [j.value for j in jobs]
            print(sum(1 for v in values if v == 20))
        """)
        done = subprocess.run([sys.executable, "-c", script], env=stack.settings.child_env(), capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "30"
