"""The service's Celery app; workers run `celery -A orders_api.celery:app worker`, the API `uvicorn
orders_api.main:api`, both given the broker and result backend by the environment (as a container would be)."""
import os

from celery import Celery

app = Celery("orders_api", broker=os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0"),
             backend=os.environ.get("CELERY_RESULT_BACKEND", "redis://localhost:6379/1"), include=["orders_api.tasks"])
app.conf.update(task_track_started=True, result_expires=3600)
