"""Django settings for djangoshop (the parts this example needs: its apps and its Celery configuration)."""
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = "django-insecure-example-only"
DEBUG = True
ALLOWED_HOSTS: list[str] = []

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "orders",
    "emails",
    "billing",
    "reports",  # the project's own reports app: loadlab, installed as loadlab.*, does not shadow it
]

DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": BASE_DIR / "db.sqlite3"}}
TIME_ZONE = "UTC"
USE_TZ = True

# Celery, read with namespace="CELERY" (djangoshop/celery.py). loadlab points the app at the run's own broker and
# result backend and shows these URLs as replaced in the report.
CELERY_BROKER_URL = "redis://localhost:6379/0"
CELERY_RESULT_BACKEND = "redis://localhost:6379/1"
CELERY_TASK_DEFAULT_QUEUE = "default"
# mail and payment work on queues of their own, so a slow mail server never holds up a charge
CELERY_TASK_ROUTES = {
    "emails.tasks.*": {"queue": "emails"},
    "billing.tasks.*": {"queue": "billing"},
}
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
