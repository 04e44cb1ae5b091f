"""The project's Celery app, laid out as Django's "First steps with Django" guide has it."""
from celery import Celery

from djangoshop import settings as project_settings

# A Django project also sets DJANGO_SETTINGS_MODULE here, so that Celery's Django fix-up sets Django up in the
# workers; this example runs without Django installed, where the fix-up would only warn (manage.py sets it).
app = Celery("djangoshop")
# A Django project would say "django.conf:settings"; the settings module itself holds the same CELERY_* names and
# needs no Django to be read.
app.config_from_object("djangoshop.settings", namespace="CELERY")
# Django's autodiscovery lists INSTALLED_APPS from its app registry; the same list, read without Django.
app.autodiscover_tasks([name for name in project_settings.INSTALLED_APPS if not name.startswith("django.")])
