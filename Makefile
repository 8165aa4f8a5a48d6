# Every target creates .venv (if missing) and installs the project into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-slow demo lint format bench clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Two workers (one per core); a file's tests stay on one worker so they share compilations.
test: lint
	$(PY) -m pytest -q -n 2 --dist loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m slow -o addopts=''

demo: $(STAMP)
	$(PY) -m experiments.recall.pipeline --preset=quick --workdir=runs/demo --params_dir=experiments/recall/params

bench: $(STAMP)
	$(PY) -m experiments.benchmarks.bench_core

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
