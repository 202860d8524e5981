# Two commands on a fresh machine: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint format dev emulators bench-diff bench-latency bench-load soak lock clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade "pip==26.3"
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sync-pipeline demo

test: $(STAMP)
	$(VENV)/bin/ruff check sync_pipeline tests benchmarks tools
	$(PY) -m pytest -n 2 --dist loadgroup -q

lint: $(STAMP)
	$(VENV)/bin/ruff check sync_pipeline tests benchmarks tools
	$(VENV)/bin/ruff format --check sync_pipeline tests benchmarks tools

format: $(STAMP)
	$(VENV)/bin/ruff format sync_pipeline tests benchmarks tools
	$(VENV)/bin/ruff check --fix sync_pipeline tests benchmarks tools

emulators: $(STAMP)
	$(VENV)/bin/sync-pipeline emulators

dev: $(STAMP)
	$(VENV)/bin/sync-pipeline dev

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
