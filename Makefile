# The README's two commands: `make run` and `make test`. Each creates .venv when missing and installs the
# project into it; a stamp per extra makes a second call skip pip when pyproject.toml has not changed.
# `make run` installs only what a run needs, so a fresh clone reaches its first report sooner.
PY ?= python3
VENV := .venv
LOADLAB := $(VENV)/bin/loadlab
PIP := $(VENV)/bin/pip install --quiet --disable-pip-version-check

.PHONY: run test install clean

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)

$(VENV)/.run-stamp: pyproject.toml | $(VENV)/bin/python
	$(PIP) -e .
	touch $@

$(VENV)/.test-stamp: pyproject.toml | $(VENV)/bin/python
	$(PIP) -e '.[test]'
	touch $@ $(VENV)/.run-stamp

install: $(VENV)/.test-stamp

run: $(VENV)/.run-stamp
	$(LOADLAB) run smoke

# Two test files at a time (pytest-xdist; a file's tests stay in one worker with its module fixtures): ~40 % faster
# on 2 cores, which keeps the suite near its 10-minute budget. TEST_WORKERS=0 runs them one by one.
TEST_WORKERS ?= 2
test: $(VENV)/.test-stamp
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) reports/runs
