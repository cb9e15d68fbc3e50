# The project's commands. Quick start (README): `make demo` and `make test`; both create the
# environment on first use and reuse it afterwards.
SHELL := /bin/bash
VENV ?= .venv
AIRFLOW_VENV ?= .airflow-venv
PY := $(VENV)/bin/python
VAR ?= var
# pytest arguments, e.g. make test PYTEST_ARGS="-k config -x"
PYTEST_ARGS ?=

.PHONY: help setup venv airflow-venv demo experiments experiments-quick test lint format unit dist clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 16

# The stamp is rebuilt when the pins or the Horovod build change, so a second `make` is a no-op.
$(VENV)/.installed: pyproject.toml scripts/setup_env.sh scripts/install_horovod.sh
	scripts/setup_env.sh $(VENV)
	touch $@

venv: $(VENV)/.installed  ## create/update the pipeline environment (.venv, Horovod included)

$(AIRFLOW_VENV)/.installed: scripts/setup_airflow.sh
	scripts/setup_airflow.sh $(AIRFLOW_VENV)
	touch $@

airflow-venv: $(AIRFLOW_VENV)/.installed  ## create the separate Airflow environment

# Both environments side by side: Airflow's pip install runs while Horovod compiles.
setup:  ## create/update both environments at once (.venv and .airflow-venv)
	$(MAKE) --no-print-directory -j2 venv airflow-venv

demo: venv  ## run the pipeline end to end on the embedded defaults (outputs under var/demo)
	OMP_NUM_THREADS=1 $(PY) -m esmm.demo --workdir $(VAR)/demo

experiments: venv  ## the paper comparison + open questions on the demo preset (python -m experiments all)
	OMP_NUM_THREADS=1 $(PY) -m experiments all --config conf/experiment.yaml

experiments-quick: venv  ## the same on small data with fewer seeds (minutes)
	OMP_NUM_THREADS=1 $(PY) -m experiments all --config conf/experiment.yaml --quick

lint: venv  ## ruff lint + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv  ## apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: setup  ## set up, lint, then the whole test suite (unit + integration)
	$(MAKE) --no-print-directory lint
	OMP_NUM_THREADS=1 $(PY) -m pytest $(PYTEST_ARGS)

unit: venv  ## the fast tests only (no integration)
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

dist: venv  ## build the wheel that spark-submit --py-files ships to executors (dist/)
	$(PY) -m pip wheel --no-deps -w dist .

clean:  ## remove generated data (var/) and build outputs; keeps the environments
	rm -rf $(VAR) build dist *.egg-info
