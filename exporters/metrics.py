"""Prometheus metric names, defined once for every loadlab process (workers, producer, exporter service)."""

# --- exporter service (broker and event side) -------------------------------------------------------------------
celery_queue_length = "celery_queue_length"
celery_queue_unacked = "celery_queue_unacked"
celery_worker_up = "celery_worker_up"
celery_worker_tasks_active = "celery_worker_tasks_active"
