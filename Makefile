# ich-node: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv system-deps test test-all lint demo demo-stop faults docker-check clean

venv: $(STAMP)

# The torch range in pyproject.toml admits the release pip finds locally.
# TORCH_INDEX=https://download.pytorch.org/whl/cpu: CPU-only PyTorch (no CUDA libraries).
TORCH_INDEX ?=
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if [ -n "$(TORCH_INDEX)" ]; then \
		$(PY) -m pip install --quiet torch torchvision --index-url "$(TORCH_INDEX)"; fi
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Real peers and validators for the tests: DCMTK (storescu, storescp, echoscu, dcmcjpeg,
# dsrdump...), dicom3tools (dciodvfy), Orthanc with its web viewer (the PACS loop) and its
# DICOMweb plugin (STOW-RS destinations),
# Chromium and its chromedriver (viewer screenshots, the web console's Selenium tests),
# openssl (TLS certificates), PostgreSQL (the shared-store tests start a throwaway cluster
# with its initdb/pg_ctl). Installed when run as root;
# otherwise the tests that need them skip and say so.
SYSTEM_PACKAGES := dcmtk dicom3tools orthanc orthanc-webviewer orthanc-dicomweb chromium \
	chromium-driver openssl postgresql
system-deps:
	@if command -v dciodvfy >/dev/null && [ -x /usr/bin/storescp ] && [ -x /usr/sbin/Orthanc ] \
		&& [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] \
		&& command -v chromium >/dev/null && [ -x /usr/bin/chromedriver ] \
		&& command -v openssl >/dev/null \
		&& ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			$(SYSTEM_PACKAGES) >/dev/null; \
	else echo "note: run as root or install $(SYSTEM_PACKAGES) for the full test suite"; fi

test: venv system-deps
	$(PY) -m pytest -m "not slow and not gpu" -q

test-all: venv system-deps
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check ich_node training tests scripts benchmarks
	$(VENV)/bin/ruff format --check ich_node training tests scripts benchmarks
	$(VENV)/bin/mypy

demo: venv
	$(PY) scripts/demo.py

# Stops the Orthanc that `make demo` leaves running for you to browse the results.
demo-stop:
	$(PY) scripts/demo.py stop

# The full crash-consistency run (30 SIGKILLs while studies stream in); see docs/reliability.md.
faults: venv system-deps
	$(PY) benchmarks/faults.py --kills 30 --json benchmarks/results/faults.json

# Builds the Docker image and runs it end to end (needs a Docker engine and DCMTK);
# DOCKER_CHECK_ARGS passes options, e.g. --build-arg BASE_IMAGE=... (docs/deployment.md).
docker-check: venv system-deps
	$(PY) scripts/docker_check.py $(DOCKER_CHECK_ARGS)

clean:
	rm -rf demo .pytest_cache .mypy_cache .ruff_cache
