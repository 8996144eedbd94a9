# Everything runs inside .venv; TORCH_EXTENSIONS_DIR keeps DeepSpeed's JIT-built ops per environment.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export PYTHONWARNINGS := ignore::FutureWarning
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup test test-fast demo bench bench-quality clean

# The CPU wheel of torch lies on this machine's disk; pinning it first keeps pip from pulling a CUDA build.
$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	$(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"
	touch $@

setup: $(VENV)/.installed

## All test tiers: unit, 2-rank DeepSpeed (dist), launchers and SLURM (integration), real weights (real).
test: setup
	$(PY) -m pytest -m "" -q || [ $$? -eq 5 ]

## The fast unit tier only (what a bare `pytest` runs).
test-fast: setup
	$(PY) -m pytest -q || [ $$? -eq 5 ]

## The main job: SmolLM2-135M + real text, NeuroPrune on 2 CPU ranks (ZeRO-3), compact export, summary.
demo: setup
	$(PY) tools/demo.py

bench: setup
	$(PY) tools/bench_overhead.py

## NeuroPrune vs plain L1 vs magnitude pruning at 25/50/70% on SmolLM2 and MiniLM (about an hour on 2 cores).
bench-quality: setup
	$(PY) tools/bench_quality.py

clean:
	rm -rf $(VENV) runs
