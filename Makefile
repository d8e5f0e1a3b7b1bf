# Every target creates or reuses .venv; the stamp re-installs only when the dependency files change.
VENV     ?= .venv
PY       := $(VENV)/bin/python
PIP      := $(PY) -m pip
STAMP    := $(VENV)/.installed
APT_PKGS := redis-server prometheus
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: run test lint bench bench-quick bench-engine bench-admission bench-stores soak apt clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/meltguard serve

# Debian's redis-server and prometheus are real peers in the test suite; install only what is missing.
apt:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

test: $(STAMP) apt
	$(VENV)/bin/ruff check meltguard benchmarks tests
	$(VENV)/bin/mypy
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check meltguard benchmarks tests
	$(VENV)/bin/mypy

# The dev harnesses live in benchmarks/ (run from the repository root); meltguard never imports them.
bench-engine: $(STAMP)
	$(PY) -m benchmarks.engine

bench-admission: $(STAMP) apt
	$(PY) -m benchmarks.admission

bench-stores: $(STAMP) apt
	$(PY) -m benchmarks.stores

bench: $(STAMP)
	$(VENV)/bin/meltguard bench --out bench-results

bench-quick: $(STAMP)
	$(VENV)/bin/meltguard bench --quick --out bench-results/quick

SOAK_SECONDS ?= 600
soak: $(STAMP)
	mkdir -p bench-results
	$(PY) -m benchmarks.soak --seconds $(SOAK_SECONDS) --json bench-results/soak.json

clean:
	rm -rf $(VENV) bench-results .pytest_cache .mypy_cache .ruff_cache
