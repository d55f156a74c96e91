# gptexp: every target is a thin shell over a documented Python command. `make help` lists them.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# On a machine without an NVIDIA GPU, PyTorch's CPU wheel is installed first, so that pip does
# not pull the multi-GB CUDA build to satisfy "torch>=2.4".
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
RUN ?=
ARGS ?=
NPROC ?= 1
CORPUS ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install train resume eval export sweep compare bench test lint format clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-9s %s\n", $$1, $$2}'

install:  ## Install gptexp and its dev + sweep extras (CPU PyTorch where no GPU is present)
	@if ! $(PYTHON) -c "import torch" 2>/dev/null && ! command -v nvidia-smi >/dev/null 2>&1; then \
		echo "no NVIDIA GPU: installing the CPU build of PyTorch $(TORCH_VERSION)"; \
		$(PIP) install --retries 1 "torch==$(TORCH_VERSION)+cpu" --extra-index-url $(TORCH_CPU_INDEX); \
	fi
	$(PIP) install -e ".[dev,sweep]"

train:  ## Train a run: make train ARGS="model=small training.max_steps=2000"
	$(PYTHON) -m gptexp.train $(ARGS)

resume:  ## Continue a run where it stopped: make resume RUN=<run dir> [ARGS=...] [NPROC=n]
	@test -n "$(RUN)" || { echo "usage: make resume RUN=<run dir> [ARGS=\"key=value ...\"] [NPROC=n]"; exit 2; }
ifeq ($(NPROC),1)
	$(PYTHON) -m gptexp.resume run=$(RUN) $(ARGS)
else
	torchrun --standalone --nproc_per_node=$(NPROC) -m gptexp.resume run=$(RUN) $(ARGS)
endif

eval:  ## Evaluate a run (or a sweep): make eval RUN=<dir> [ARGS="ckpt=best samples=3"]
	@test -n "$(RUN)" || { echo "usage: make eval RUN=<run or sweep dir> [ARGS=...]"; exit 2; }
	$(PYTHON) -m gptexp.eval run=$(RUN) $(ARGS)

export:  ## Export a run's weights as safetensors: make export RUN=<dir> [ARGS="ckpt=best"]
	@test -n "$(RUN)" || { echo "usage: make export RUN=<run dir> [ARGS=...]"; exit 2; }
	$(PYTHON) -m gptexp.export run=$(RUN) $(ARGS)

sweep:  ## A multirun: make sweep ARGS="model=nano,tiny training.lr=1e-3,3e-4"
	$(PYTHON) -m gptexp.train -m $(ARGS)

compare:  ## Compare runs: make compare RUN=<sweep dir or run dirs> [ARGS="--plot"]
	@test -n "$(RUN)" || { echo "usage: make compare RUN=<sweep dir or run dirs> [ARGS=...]"; exit 2; }
	$(PYTHON) -m gptexp.compare $(RUN) $(ARGS)

bench:  ## Whole process and per step next to a plain script, with the breakdown, into outputs/bench/<date>_<time>.json [CORPUS=path]
	$(PYTHON) -m gptexp.bench $(if $(CORPUS),--corpus $(CORPUS),)

test:  ## Run the test suite (CPU only, a few minutes)
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

lint:  ## ruff lint and format check
	$(PYTHON) -m ruff check gptexp tests
	$(PYTHON) -m ruff format --check gptexp tests

format:  ## ruff format and autofix
	$(PYTHON) -m ruff format gptexp tests
	$(PYTHON) -m ruff check --fix gptexp tests

clean:  ## Remove caches (runs under outputs/ are kept)
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
