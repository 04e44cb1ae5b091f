"""Entry point for ``celery -A loadlab.stack.worker_app:app worker``: the app built from the settings the supervisor passed."""
from loadlab.stack.app import make_app

app = make_app(role="worker")
