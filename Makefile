# edgemart — the two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= $(abspath ../shared)
export EDGEMART_CORPUS ?= $(HOME)/.cache/edgemart-corpus
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
APT_STAMP := $(VENV)/.apt-installed

.PHONY: venv corpus demo test test-fast lint fuzz bench clean apt scale-test

venv: $(STAMP)

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
	$(PY) -m pip install -q --disable-pip-version-check -e '.[all,dev]'
	touch $@

# Debian packages the tests use: faketime (clock-rollback tests on the CLI), chromium (Playwright UI test),
# postgresql (the scale-out database suites), softhsm2 (the PKCS#11 key vault suite), swtpm + tpm2-tools
# (the TPM 2.0 rollback anchor, tests/edge_runtime/test_tpm_anchor.py).
APT_PACKAGES := faketime chromium postgresql softhsm2 swtpm tpm2-tools
apt: $(APT_STAMP)
$(APT_STAMP): Makefile | $(STAMP)
	@if ! command -v faketime >/dev/null || ! command -v chromium >/dev/null \
	    || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v softhsm2-util >/dev/null \
	    || ! command -v swtpm >/dev/null || ! command -v tpm2_nvdefine >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	  else echo "make: some of $(APT_PACKAGES) missing and not root; the tests needing them will be skipped"; fi; fi
	touch $@

corpus:
	@if [ -f "$(SHARED)/corpus/fetch.sh" ]; then bash "$(SHARED)/corpus/fetch.sh" "$(EDGEMART_CORPUS)"; \
	else echo "make: $(SHARED)/corpus/fetch.sh not found: put the shared/ folder beside this checkout (or set SHARED=...)" >&2; exit 2; fi

demo: venv corpus
	$(PY) -m edgemart.demo --corpus "$(EDGEMART_CORPUS)" --out demo-out

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	PYTHONPATH=. $(VENV)/bin/lint-imports

test: venv apt corpus lint
	$(VENV)/bin/pytest -q

test-fast: venv corpus
	$(VENV)/bin/pytest -q -m 'not slow' -x

# Every parser's hypothesis fuzzer at 20,000 inputs (make test runs them at 300), then the coverage-guided
# atheris harnesses for the binary formats when atheris is installed (pip install '.[fuzz]').
fuzz: venv
	EDGEMART_FUZZ_EXAMPLES=20000 $(VENV)/bin/pytest -q tests -k fuzz
	@if $(PY) -c 'import atheris' 2>/dev/null; then \
	  $(PY) tests/drm/fuzz_atheris.py -atheris_runs=200000 && $(PY) tests/fuzz/fuzz_atheris_bundle.py -atheris_runs=500000; \
	else echo "make fuzz: atheris not installed (pip install '.[fuzz]'); skipping the coverage-guided runs"; fi

# The store scaled out on this machine: PostgreSQL + SeaweedFS (S3) + 4 gunicorn app workers + 2 job workers,
# 64 concurrent clients for 60 s steady and 60 s with faults (job worker and app worker SIGKILLed, PostgreSQL
# restarted). Fails on any 5xx (steady) / 500 (faults), a lost upload, a double-issued seat or a lost record.
SCALE_ARGS ?= --duration 60 --clients 64 --app-workers 4 --job-workers 2
scale-test: venv apt corpus
	$(PY) -m bench.scale $(SCALE_ARGS) --json bench/results-scale.json

# The README table and bench/results-quick.json come from one --quick run (BENCH_NOTE: say if the machine was shared).
BENCH_NOTE ?=
bench: venv corpus
	$(VENV)/bin/edgemart bench --quick --save bench/results-quick.json --readme README.md --note "$(BENCH_NOTE)"

clean:
	rm -rf $(VENV) demo-out .pytest_cache .mypy_cache .ruff_cache
