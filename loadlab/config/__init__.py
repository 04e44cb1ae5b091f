"""Configuration shared by every loadlab process: the one settings object and the Celery settings derived from it."""
