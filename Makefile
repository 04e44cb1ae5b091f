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

test: $(VENV)/.test-stamp
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) reports/runs
