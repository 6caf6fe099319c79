PY ?= .venv/bin/python
PIP = $(PY) -m pip

.PHONY: install demo test test-fast lint bench clean

.venv/bin/python:
	python3 -m venv .venv

# torch first, pinned: here it resolves to the CPU wheel on disk; a bare `torch` would pull a CUDA build.
install: .venv/bin/python
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,dist]"

demo:
	$(PY) -m kdtool demo

test:
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow"

lint:
	$(PY) -m ruff check src objectives tests benchmarks examples
	$(PY) -m ruff format --check src objectives tests benchmarks examples

bench:
	$(PY) benchmarks/bench_memory.py --rounds 2

clean:
	rm -rf build dist runs demo_runs .pytest_cache
