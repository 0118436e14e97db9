# ich-node: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv system-deps test test-all lint demo faults clean

venv: $(STAMP)

# The torch range in pyproject.toml admits the release pip finds locally.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# DCMTK (storescu, storescp, echoscu, dcmcjpeg, dsrdump...) and dicom3tools (dciodvfy)
# are real peers and validators for the tests. Installed when run as root; otherwise
# the tests that need them skip and say so.
system-deps:
	@if command -v dciodvfy >/dev/null && [ -x /usr/bin/storescp ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dcmtk dicom3tools >/dev/null; \
	else echo "note: run as root or install dcmtk and dicom3tools for the full test suite"; fi

test: venv system-deps
	$(PY) -m pytest -m "not slow and not gpu" -q

test-all: venv system-deps
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check ich_node training tests
	$(VENV)/bin/ruff format --check ich_node training tests
	$(VENV)/bin/mypy

demo: venv
	$(PY) scripts/demo.py

# The full crash-consistency run (30 SIGKILLs while studies stream in); see docs/reliability.md.
faults: venv system-deps
	$(PY) benchmarks/faults.py --kills 30 --json benchmarks/results/faults.json

clean:
	rm -rf demo .pytest_cache .mypy_cache .ruff_cache
