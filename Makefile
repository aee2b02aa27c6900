# The two commands: `make run` and `make test`. Both bootstrap .venv on first use and
# reinstall only when pyproject.toml changes (the stamp files record the last install).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# The default experiment; override e.g. `make run CONFIG=configs/lm.yaml`.
CONFIG ?= configs/default.yaml

.PHONY: run test demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.stamp-run: pyproject.toml | $(PY)
	$(PIP) install -e ".[experiments]"
	touch $@

$(VENV)/.stamp-test: pyproject.toml | $(PY)
	$(PIP) install -e ".[test,experiments]"
	touch $@

run: $(VENV)/.stamp-run
	$(PY) -m experiments.train --config $(CONFIG)

demo: $(VENV)/.stamp-run
	$(PY) -m jattn.demo

# worksteal: a worker that runs out of tests takes queued ones from the other (the
# suite has a few minute-long tests; the default split can leave one worker idle).
test: $(VENV)/.stamp-test
	$(PY) -m pytest -n auto --dist worksteal -q

bench: $(VENV)/.stamp-run
	$(PY) -m experiments.benchmark --config configs/bench_cpu.yaml

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
