"""The service's Celery app; workers run `celery -A orders_api.celery:app worker`."""
from celery import Celery

app = Celery("orders_api", broker="redis://localhost:6379/0", backend="redis://localhost:6379/1",
             include=["orders_api.tasks"])
app.conf.update(task_track_started=True, result_expires=3600)
