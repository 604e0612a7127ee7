# Set-up and entry points; every target installs what it needs first.
PYTHON ?= python
PIP := $(PYTHON) -m pip install --quiet -c .ci/constraints.txt

.PHONY: install demo test test-long typecheck bench

install:
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test]"

demo: install
	partitioner plan gpt2-xl --devices "a100-80gb x4" --objective throughput --batch-size 8

test: install
	$(PYTHON) -m pytest -q

test-long: install
	$(PYTHON) -m pytest -q -m ""

typecheck: install
	$(PYTHON) -m mypy

bench: install
	$(PYTHON) -m benchmarks.run --suite quick
