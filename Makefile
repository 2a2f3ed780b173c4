# The two commands a new user needs: `make demo` and `make test`. Both set up on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV

.PHONY: setup demo test test-fast lint bench clean

setup:
	@bash .ci/setup.sh

demo: setup
	$(VENV)/bin/tvmdeploy demo

# Two workers, whole modules per worker (module fixtures built once): the suite is mostly
# single-threaded compile work, so two workers on two cores take about half the time. Modules
# go out longest first (tests/conftest.py LONGEST_FIRST), not xdist's most-tests-first.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m ruff check compiler runtime targets tests bench

bench: setup
	$(PY) bench/x86_latency.py

clean:
	rm -rf build .pytest_cache
