# The two commands a new user needs: `make demo` and `make test`. Both set up on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV

.PHONY: setup demo test test-fast lint bench clean

setup:
	@bash .ci/setup.sh

demo: setup
	$(VENV)/bin/tvmdeploy demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m ruff check compiler runtime targets tests bench

bench: setup
	$(PY) bench/x86_latency.py

clean:
	rm -rf build .pytest_cache
