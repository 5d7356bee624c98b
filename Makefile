# `make study` and `make test` work on a fresh machine: they create .venv if it is missing and install
# protomem into it (torch is pinned to the CPU build that pip finds locally, see pyproject.toml).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install study test test-slow lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# The main job. Until the study lands this runs the grammar demo.
study: $(STAMP)
	$(VENV)/bin/protomem grammar sample --vocab 8 --classes 8 --rules 3 --depth 3 --zipf 1.0 \
		--count 1000 --seed 0 --out runs/grammar-demo --overwrite
	$(VENV)/bin/protomem grammar check --grammar runs/grammar-demo/grammar.json \
		--strings runs/grammar-demo/strings.parquet

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
