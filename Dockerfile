# One image for every loadlab process of docker-compose.yml: `loadlab api|worker|exporter`, `celery ... flower`, `locust`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Copy only what the package needs: never a local .venv, .git, .env or run directories into the image.
COPY pyproject.toml README.md ./
COPY loadlab ./loadlab
COPY stack ./stack
COPY exporters ./exporters
COPY loadtests ./loadtests
COPY reports ./reports
COPY dashboards ./dashboards
RUN pip install .

# Run unprivileged; the home directory is writable for anything a process must keep (e.g. metrics files under /tmp).
RUN useradd --create-home --uid 10001 loadlab
USER loadlab

# api, Locust web UI, Flower, exporter / worker / Locust metrics
EXPOSE 8000 8089 5555 9808 9809 9810
CMD ["loadlab", "--help"]
