# ivcache developer and CI targets.  `make test` is what CI runs (.ci/run).
VENV ?= .venv
PY = $(VENV)/bin/python
WHEEL_VENV ?= .venv-wheel
WHEEL_DIR = .build/wheel
PYTEST = $(VENV)/bin/pytest
EDITABLE = --config-settings editable_mode=strict

# A strict editable install links each file into build/__editable__.*: a file added to the
# source folders is invisible until reinstalled, so the install depends on every file there.
SRC := $(shell find core adapters entrypoints -type f ! -path '*/__pycache__/*' ! -name '*.py[co]' 2>/dev/null)

.PHONY: install ceph-bindings demo docs lint ruff mypy imports bare-imports test test-integration test-rest unit integration e2e wheel-test bench clean

install: $(VENV)/.installed ceph-bindings

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -U pip

# compileall: the links in build/__editable__.* get their bytecode now, once. Where
# PYTHONDONTWRITEBYTECODE is set (as on these machines) Python never writes it itself, and
# every `ivcache` command would compile the package anew (a fifth of a second each).
$(VENV)/.installed: pyproject.toml $(SRC) | $(PY)
	$(PY) -m pip install -q -e '.[test]' $(EDITABLE)
	$(PY) -m compileall -q build/__editable__.*/ivcache > /dev/null
	touch $@

# Debian's Ceph bindings (python3-rbd, python3-rados) linked into the venv whenever they are
# installed. The script looks at the links themselves (are they there, do they point at the
# installed modules), so bindings installed after the venv are linked by the next make; an
# mtime rule would miss them, as Debian's files keep their build date.
ceph-bindings: | $(VENV)/.installed
	@$(PY) tools/link_ceph_bindings.py --if-needed

demo: install
	$(VENV)/bin/ivcache demo

# The configuration reference is generated from the option table in entrypoints/config.py
# (tests/integration/test_config_docs.py fails while the page is out of date).
docs: install
	$(PY) -m ivcache.entrypoints.config --markdown > docs/configuration.md

lint: install ruff mypy imports bare-imports

ruff: install
	$(VENV)/bin/ruff check .

# mypy checks the installed package names (-p), then tests and bench (a separate run: mypy cannot
# mix -p and paths).  Errors in the package are reported under build/__editable__.*/ivcache/,
# whose files are symlinks to core/, adapters/, entrypoints/.
mypy: install
	$(VENV)/bin/mypy -p ivcache.core -p ivcache.adapters -p ivcache.entrypoints
	$(VENV)/bin/mypy tests bench

imports: install
	$(VENV)/bin/lint-imports

bare-imports:
	python3 tools/check_bare_imports.py

# Two lanes at once, about equal in length: the real-part suites (tests/integration:
# PostgreSQL, glance-api, Ceph, RabbitMQ, Keystone, qemu-img, with the e2e files that drive
# the CLI against Glance, Keystone and RabbitMQ, so they share that lane's servers)
# followed by the wheel test; and unit + the rest of e2e. Much of each is waiting for
# servers, disks and CLI processes, so on two cores they overlap well; every fixture takes
# its own temporary directory and free ports, so they cannot meet (the wheel is built in
# build/lib and .build, never in build/__editable__.*, which the other lane's editable
# install reads). Each lane's output is printed as a whole when it ends.
E2E_WITH_SERVERS = tests/e2e/test_cli_glance.py tests/e2e/test_cli_keystone.py \
	tests/e2e/test_cli_messaging.py
test: install lint
	$(MAKE) --no-print-directory -j2 --output-sync=target test-integration test-rest

test-integration: install
	$(PYTEST) -p no:cacheprovider tests/integration $(E2E_WITH_SERVERS)
	$(MAKE) --no-print-directory wheel-test

test-rest: install
	$(PYTEST) -p no:cacheprovider tests/unit tests/e2e $(addprefix --ignore=,$(E2E_WITH_SERVERS))

unit: install
	$(PYTEST) tests/unit

integration: install
	$(PYTEST) tests/integration

e2e: install
	$(PYTEST) tests/e2e

# Build a real wheel, install it into its own venv and run tests from a copy of tests/
# outside the repository, so the source folders are not importable: a package or data file
# missing from the wheel fails here (an editable install hides such omissions). The tests
# are those that reach every file of the package: the unit tests (test_public_names imports
# every module) and the CLI end to end on the embedded default, with real images, and on
# PostgreSQL (the migrations, the drivers of the extras). The rest of tests/e2e (the crash
# matrix above all) goes through the same files again, and runs in `make test` already.
WHEEL_TESTS ?= tests/unit tests/e2e/test_cli.py tests/e2e/test_cli_formats.py \
	tests/e2e/test_cli_postgres.py
wheel-test:
	rm -rf $(WHEEL_DIR) build/lib build/bdist.* *.egg-info
	$(or $(wildcard $(PY)),python3) -m pip wheel --no-deps -w $(WHEEL_DIR) .
	test -x $(WHEEL_VENV)/bin/python || python3 -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip uninstall -y -q ivcache
	$(WHEEL_VENV)/bin/python -m pip install "$$(ls $(WHEEL_DIR)/ivcache-*.whl)[test]"
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  cp -r tests pyproject.toml "$$tmp"/ && \
	  if [ -f conftest.py ]; then cp conftest.py "$$tmp"/; fi && \
	  cd "$$tmp" && $(abspath $(WHEEL_VENV))/bin/pytest -p no:cacheprovider $(WHEEL_TESTS) -x -q

# `make bench BENCH="name ..."` runs only the benches whose function or figure names match.
bench: install
	$(VENV)/bin/python bench/run.py $(BENCH)

clean:
	rm -rf $(VENV) $(WHEEL_VENV) .build build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
