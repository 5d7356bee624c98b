# `make study` and `make test` work on a fresh machine: they create .venv if it is missing and install
# protomem into it (torch is pinned to the CPU build that pip finds locally, see pyproject.toml).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install study test test-slow check-install docs docs-serve bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# The main job: the default study (<= 5 minutes on 2 cores) into a fresh runs/study-<UTC time>;
# the last line printed is the report's path.
study: $(STAMP)
	$(VENV)/bin/protomem study --preset default --out runs/study-$$(date -u +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

# A user's install: `pip install .` without extras into a fresh venv (torch from the local wheel), then
# every command's --help, --version, a tiny `grammar sample` and the one-line hint of a sweep without Ray.
check-install:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PYTHON) -m venv "$$tmp/venv" && \
	"$$tmp/venv/bin/python" -m pip install --quiet --disable-pip-version-check . && \
	"$$tmp/venv/bin/python" .ci/check_install.py

# The documentation site (MkDocs, Material theme, mkdocstrings) into site/; --strict turns every warning
# (a broken link, an API page that does not resolve) into an error.
$(VENV)/.docs-stamp: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,docs]'
	@touch $@

docs: $(VENV)/.docs-stamp
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: $(VENV)/.docs-stamp
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis site
