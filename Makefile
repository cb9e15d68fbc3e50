# The project's commands. Quick start (README): `make demo` and `make test`; both create the
# environment on first use and reuse it afterwards.
SHELL := /bin/bash
VENV ?= .venv
AIRFLOW_VENV ?= .airflow-venv
PY := $(VENV)/bin/python
VAR ?= var
DIST ?= dist
# pytest arguments, e.g. make test PYTEST_ARGS="-k config -x"
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` / `make unit` (0 = one process); tests/conftest.py groups
# the tests so that each worker builds a file's fixtures once and the longest groups go first.
TEST_WORKERS ?= 3
XDIST := -n $(TEST_WORKERS)

.PHONY: help setup venv airflow-venv demo experiments experiments-quick test test-hosts lint format unit dist clean

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

# The multi-host test's sshd (Debian's openssh-server, as root; otherwise that test skips).
test-hosts:  ## install what tests/test_deploy.py's test hosts need (sshd, iproute2)
	scripts/setup_test_hosts.sh

test: setup test-hosts  ## set up, lint, then the whole test suite (unit + integration)
	$(MAKE) --no-print-directory lint
	OMP_NUM_THREADS=1 $(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

unit: venv  ## the fast tests only (no integration)
	OMP_NUM_THREADS=1 $(PY) -m pytest $(XDIST) -m "not integration" $(PYTEST_ARGS)

# The wheel (pip install on nodes and images) and the same code as a zip, which is what
# spark-submit --py-files puts on the executors' path (PySpark adds .zip/.egg, not .whl).
dist: venv  ## build the code for a cluster: $(DIST)/*.whl and $(DIST)/*.zip (spark-submit --py-files)
	rm -rf $(DIST)
	$(PY) -m pip wheel -q --no-deps -w $(DIST) .
	for wheel in $(DIST)/*.whl; do cp "$$wheel" "$${wheel%-py3-none-any.whl}.zip"; done
	@ls $(DIST)/*

clean:  ## remove generated data (var/) and build outputs; keeps the environments
	rm -rf $(VAR) build dist *.egg-info
