"""Grafana dashboards and Prometheus alert rules as code (see build.py, queries.py)."""
