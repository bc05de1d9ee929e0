# probe: two commands on a fresh Debian machine, as root:
#   make run    installs everything, then traces this host's HTTP traffic live
#   make test   installs everything, then runs the tests
VENV ?= .venv
PY := $(VENV)/bin/python
PROBE := $(VENV)/bin/probe
SETUP_STAMP := $(VENV)/.installed

.PHONY: setup compile run check test test-unit lint bench clean demo install uninstall

$(SETUP_STAMP): pyproject.toml scripts/setup.sh
	VENV=$(VENV) scripts/setup.sh

setup:
	VENV=$(VENV) scripts/setup.sh

# The hot path as C extensions (mypyc, probe/compiled.py); a no-op when current.
compile: $(SETUP_STAMP)
	$(PY) scripts/compile.py

run: compile
	$(PROBE) capture $(ARGS)

check: compile
	$(PROBE) check

# A chain of four services (Python, Go, Node.js, a slow database) on loopback,
# the probe watching with -o tree: one waterfall per request.
demo: compile
	$(PY) demo/demo.py

# Unit tests need nothing but Python; kernel and end-to-end tests need root.
# The suite runs the compiled hot path; the unit tests run once more from
# source (PROBE_PURE=1), which is what runs where it could not be compiled.
test: setup
	$(PY) -m ruff check probe tests bench
	$(PY) -m mypy bench
	$(PY) -m pytest $(PYTEST_ARGS)
	PROBE_PURE=1 $(PY) -m pytest -q -p no:cacheprovider tests/unit

test-unit: compile
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# What the probe costs, side by side with no probe and with empty BPF programs
# (root; about 9 minutes, BENCH_QUICK=1 for about 1.5). See bench/README.md.
bench: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench

lint: $(SETUP_STAMP)
	$(PY) -m ruff check probe tests bench
	$(PY) -m ruff format --check probe tests bench
	$(PY) -m mypy bench $(shell $(PY) -c 'import probe.compiled as c; print(*c.source_files())')

# The host daemon as a systemd service (deploy/systemd/probe.service): the
# code in /opt/probe, the settings in /etc/probe. See deploy/README.md.
install:
	scripts/install.sh

uninstall:
	scripts/install.sh --uninstall

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis .mypy_cache build probe/compiled.json
	find probe -name '*.so' -delete
