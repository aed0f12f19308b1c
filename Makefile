# dpfed — two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-slow lint typecheck protos check-protos bench clean

$(STAMP): pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m examples.demo

# The fast suite (pytest's addopts deselect `slow`; about 6 minutes on 2 cores); the 15
# slowest tests are listed at the end so that a test growing heavier shows up.
test: $(STAMP)
	$(PY) -m pytest -q --durations=15

# The heavier cases (`@pytest.mark.slow`, each with its reason), which make test leaves out.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

protos: $(STAMP)
	scripts/gen_protos.sh

# The issue's benchmarks, one after another (about 15 minutes on 2 cores); each writes
# bench/results/<name>.json and, for a sweep, a plot (matplotlib, installed here if missing).
bench: $(STAMP)
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install --quiet "matplotlib>=3.8"
	$(PY) bench/bench_dp_step.py
	$(PY) bench/bench_round_overhead.py
	$(PY) bench/bench_scale_sites.py
	$(PY) bench/bench_model_size.py
	$(PY) bench/bench_utility.py
	$(PY) bench/bench_accounting.py --json bench/results/accounting.json

clean:
	rm -rf demo-state .pytest_cache .mypy_cache .ruff_cache
