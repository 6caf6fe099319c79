PY ?= .venv/bin/python
PIP = $(PY) -m pip
# Written after a successful install; every target that runs kdtool depends on it, so the first
# `make demo` / `make test` on a fresh clone installs, and later ones do not (until pyproject.toml
# changes).
STAMP = .venv/.installed

.PHONY: install demo demo-quick test test-fast lint bench bench-chunk bench-peers clean

.venv/bin/python:
	python3 -m venv .venv

# torch first, pinned: here it resolves to the CPU wheel on disk; a bare `torch` would pull a CUDA build.
$(STAMP): pyproject.toml | .venv/bin/python
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,dist]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m kdtool demo

# The demo's pipeline for a few steps (two objectives) in a scratch directory, removed when it
# passes: CI's proof that `make demo` runs from a clone.
demo-quick: $(STAMP)
	out=$$(mktemp -d) && $(PY) -m kdtool demo --quick --objectives fkl,sft --output $$out/demo && rm -rf $$out

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check src objectives tests benchmarks examples
	$(PY) -m ruff format --check src objectives tests benchmarks examples

bench: $(STAMP)
	$(PY) benchmarks/bench_memory.py --rounds 2

# Step time and peak memory against the engine's chunk size (V = 16k, 32k, 152k) -> benchmarks/chunk_cpu.md
bench-chunk: $(STAMP)
	$(PY) benchmarks/bench_chunk.py --chunk-sizes 128,256,512,1024,2048 --rounds 2 --repeats 0

# Whole runs: kdtool distill vs a hand-written loop (and TRL's GKDTrainer when `trl` is installed,
# `pip install -e ".[bench]"`) -> benchmarks/peers_cpu.md; needs ../shared/data (skips without it)
bench-peers: $(STAMP)
	$(PY) benchmarks/bench_peers.py --rounds 3

clean:
	rm -rf build dist runs demo_runs .pytest_cache
