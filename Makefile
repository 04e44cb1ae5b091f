# The README's two commands: `make run` and `make test`. Each creates .venv when missing and installs the
# project into it; the stamp file makes a second call skip pip when pyproject.toml has not changed.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
LOADLAB := $(VENV)/bin/loadlab

.PHONY: run test install clean

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(LOADLAB) run smoke

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) reports/runs
