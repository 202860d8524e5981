# Two commands on a fresh machine: `make demo` and `make test`. Everything installs into .venv:
# the product (sync-pipeline, editable) and the local servers beside it (sync-devservers, from
# devservers/; the dev extra names it, and it is on no index, so pip gets it from the folder).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint format dev servers bench-diff bench-latency bench-load soak lock clean

RUFF_PATHS := sync_pipeline devservers tests benchmarks tools

$(STAMP): pyproject.toml devservers/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade "pip==26.3"
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt \
		-e '.[dev]' -e ./devservers
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sync-devservers demo

test: $(STAMP)
	$(VENV)/bin/ruff check $(RUFF_PATHS)
	$(PY) -m pytest -n 2 --dist loadgroup -q

lint: $(STAMP)
	$(VENV)/bin/ruff check $(RUFF_PATHS)
	$(VENV)/bin/ruff format --check $(RUFF_PATHS)

format: $(STAMP)
	$(VENV)/bin/ruff format $(RUFF_PATHS)
	$(VENV)/bin/ruff check --fix $(RUFF_PATHS)

servers: $(STAMP)
	$(VENV)/bin/sync-devservers serve

dev: $(STAMP)
	$(VENV)/bin/sync-devservers dev

bench-diff: $(STAMP)
	$(PY) benchmarks/bench_diff.py

bench-latency: $(STAMP)
	$(PY) benchmarks/bench_latency.py

bench-load: $(STAMP)
	$(PY) benchmarks/bench_load.py

soak: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/test_convergence.py --hypothesis-profile=soak -s

# uv.lock at the versions constraints.txt pins (after changing either pyproject.toml or the pins).
lock: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check "uv==0.13.9"
	$(PY) tools/lock.py

clean:
	rm -rf $(VENV) .data .dagster_home
