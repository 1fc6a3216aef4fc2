# The two commands of the README are `make demo` and `make test`; both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo-data

.PHONY: setup slurm-deps browser-deps demo demo-coca test test-fast test-slow lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -c constraints.txt -e '.[dev]'
	@# bytecode on every core: pip compiles one file at a time (install 239 s; this way 111 s + 59 s on 2 cores).
	@# A file that is not this Python's syntax (torch's py312_intrinsics.py) fails to compile, as under pip: ignored.
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $(STAMP)

# tests/pretrain/test_slurm.py starts a real Slurm; it needs Debian's slurm-wlm and munge, installed here when
# missing and possible (root with apt-get). Otherwise that test is skipped and says why.
slurm-deps:
	@command -v slurmctld >/dev/null && command -v munged >/dev/null || { \
	  [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && echo "installing slurm-wlm and munge" && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    slurm-wlm munge) >/dev/null 2>&1; } || \
	  echo "note: slurm-wlm/munge not installed (needs root and apt-get): the real-Slurm test will be skipped"

# tests/data_tools/test_report.py loads the report page in a real headless browser: Debian's chromium, installed
# here when missing and possible (root with apt-get). Otherwise that test is skipped and says why.
browser-deps:
	@command -v chromium >/dev/null || { \
	  [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && echo "installing chromium" && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium) >/dev/null 2>&1; } || \
	  echo "note: chromium not installed (needs root and apt-get): the report's browser test will be skipped"

demo: setup
	$(PY) -m pretrain.demo --data $(DEMO_DIR) --config configs/demo.yaml

# The same program with tiny-coca (configs/coca-demo.yaml): zero-shot top-1 and the share of eval images whose
# generated caption names their colour and shape.
demo-coca: setup
	$(PY) -m pretrain.demo --data $(DEMO_DIR) --config configs/coca-demo.yaml

# `make test` is the whole suite (what CI runs); test-fast and test-slow split it at the `slow` marker.
# TEST_WORKERS pytest-xdist processes share the tests file by file (a module's shared runs stay in one worker);
# TEST_WORKERS=0 runs them in this one process. docs/PERFORMANCE.md has the suite's time both ways.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile

test: setup slurm-deps browser-deps
	$(PY) -m pytest -q $(XDIST) --durations=25 tests

test-fast: setup browser-deps
	$(PY) -m pytest -q $(XDIST) -m "not slow" tests

test-slow: setup slurm-deps
	$(PY) -m pytest -q $(XDIST) -m slow tests

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache
