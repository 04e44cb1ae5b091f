# One image for every loadlab process of docker-compose.yml: `loadlab api|worker|exporter`, `celery ... flower`, `locust`.
# BASE_IMAGE: any image with Python >= 3.11 as `python` and `pip` (deploy/images/build.py makes one from Debian's
# packages where no image registry is reachable).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The source is installed from /src and removed: in /app (the working directory, first on `python -m`'s path) the
# repository's loadlab/ folder would shadow the installed package, whose stack, exporters, … it does not hold. Only
# the locustfile stays, for `locust -f loadtests/locustfile.py`.
WORKDIR /src

# The dependencies first, from pyproject.toml alone: a change to the code rebuilds only the last layers, not the
# ~1 minute of dependency downloads.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt

# Copy only what the package needs: never a local .venv, .git, .env or run directories into the image.
COPY README.md ./
COPY loadlab ./loadlab
COPY stack ./stack
COPY exporters ./exporters
COPY loadtests ./loadtests
COPY reports ./reports
COPY dashboards ./dashboards
RUN pip install --no-deps . \
    && mkdir -p /app/loadtests && cp loadtests/locustfile.py /app/loadtests/ && cd / && rm -rf /src
WORKDIR /app

# Run unprivileged; the home directory is writable for anything a process must keep (e.g. metrics files under /tmp).
RUN useradd --create-home --uid 10001 loadlab
USER loadlab

# api, Locust web UI, Flower, exporter / worker / Locust metrics
EXPOSE 8000 8089 5555 9808 9809 9810
CMD ["loadlab", "--help"]
