# gptexp: every target is a thin shell over a documented Python command. `make help` lists them.
#
# Outside a virtual environment everything runs in ./.venv, which the first target you type
# creates and fills (never the system Python: PEP 668 forbids it, and it is yours). Inside an
# active virtual environment (or conda env) the targets use and install into that one.
ifneq ($(or $(VIRTUAL_ENV),$(CONDA_PREFIX)),)
ENV_DIR := $(or $(VIRTUAL_ENV),$(CONDA_PREFIX))
PYTHON ?= python
else
ENV_DIR := .venv
PYTHON := $(ENV_DIR)/bin/python
endif
BOOTSTRAP_PYTHON ?= python3
PIP = $(PYTHON) -m pip
# The set-up's stamp; `make <target> INSTALLED=` skips the set-up (an environment you manage).
INSTALLED := $(ENV_DIR)/.gptexp-installed
# On a machine without an NVIDIA GPU, PyTorch's CPU wheel is installed first, so that pip does
# not pull the multi-GB CUDA build to satisfy "torch>=2.4".
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
EXTRAS ?= dev,sweep,hf,compare,tensorboard
RUN ?=
CKPT ?= last
ARGS ?=
NPROC ?= 1
CORPUS ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install train resume repair eval export fork diff sweep compare bench gpu-check \
	test lint format clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-10s %s\n", $$1, $$2}'

install: $(INSTALLED)  ## Set up: .venv (outside a virtual env), CPU PyTorch where no GPU, gptexp[dev,sweep,hf,compare,tensorboard]

$(INSTALLED): pyproject.toml
	@if [ "$(ENV_DIR)" = ".venv" ] && [ ! -x "$(PYTHON)" ]; then \
		echo "creating .venv (no virtual environment is active)"; \
		$(BOOTSTRAP_PYTHON) -m venv .venv; \
	fi
	@if ! $(PYTHON) -c "import torch" 2>/dev/null && ! command -v nvidia-smi >/dev/null 2>&1; then \
		echo "no NVIDIA GPU: installing the CPU build of PyTorch $(TORCH_VERSION)"; \
		$(PIP) install --retries 1 "torch==$(TORCH_VERSION)+cpu" --extra-index-url $(TORCH_CPU_INDEX) \
			|| $(PIP) install "torch==$(TORCH_VERSION)"; \
	fi
	$(PIP) install -e ".[$(EXTRAS)]"
	@touch $(INSTALLED)

train: $(INSTALLED)  ## Train a run: make train ARGS="model=small training.max_steps=2000"
	$(PYTHON) -m gptexp.train $(ARGS)

resume: $(INSTALLED)  ## Continue a run where it stopped: make resume RUN=<run dir> [ARGS=...] [NPROC=n]
	@test -n "$(RUN)" || { echo "usage: make resume RUN=<run dir> [ARGS=\"key=value ...\"] [NPROC=n]"; exit 2; }
ifeq ($(NPROC),1)
	$(PYTHON) -m gptexp.resume run=$(RUN) $(ARGS)
else
	$(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) -m gptexp.resume run=$(RUN) $(ARGS)
endif

repair: $(INSTALLED)  ## Rebuild a run's checkpoints/manifest.json from the checkpoint files that load: make repair RUN=<run dir>
	@test -n "$(RUN)" || { echo "usage: make repair RUN=<run dir>"; exit 2; }
	$(PYTHON) -m gptexp.repair run=$(RUN)

eval: $(INSTALLED)  ## Evaluate a run (or a sweep): make eval RUN=<dir> [ARGS="ckpt=best samples=3"]
	@test -n "$(RUN)" || { echo "usage: make eval RUN=<run or sweep dir> [ARGS=...]"; exit 2; }
	$(PYTHON) -m gptexp.eval run=$(RUN) $(ARGS)

export: $(INSTALLED)  ## Export a run's model: make export RUN=<dir> [ARGS="ckpt=best format=hf"]
	@test -n "$(RUN)" || { echo "usage: make export RUN=<run dir> [ARGS=...]"; exit 2; }
	$(PYTHON) -m gptexp.export run=$(RUN) $(ARGS)

diff: $(INSTALLED)  ## Where two runs part: make diff RUN="<run A> <run B>" [ARGS="--replay --json"]
	@test -n "$(RUN)" || { echo "usage: make diff RUN=\"<run A> <run B>\" [ARGS=...]"; exit 2; }
	$(PYTHON) -m gptexp.diff $(RUN) $(ARGS)

fork: $(INSTALLED)  ## Branch a run from a checkpoint: make fork RUN=<run dir> [CKPT=last|best|<step>] [ARGS="training.lr=3e-4"]
	@test -n "$(RUN)" || { echo "usage: make fork RUN=<run dir> [CKPT=last|best|<step>] [ARGS=\"key=value ...\"]"; exit 2; }
	$(PYTHON) -m gptexp.fork run=$(RUN) ckpt=$(CKPT) $(ARGS)

sweep: $(INSTALLED)  ## A multirun: make sweep ARGS="model=nano,tiny training.lr=1e-3,3e-4"
	$(PYTHON) -m gptexp.train -m $(ARGS)

compare: $(INSTALLED)  ## Compare runs: make compare RUN="<sweep dir or run dirs>" [ARGS=--plot]
	@test -n "$(RUN)" || { echo "usage: make compare RUN=<sweep dir or run dirs> [ARGS=...]"; exit 2; }
	$(PYTHON) -m gptexp.compare $(RUN) $(ARGS)

bench: $(INSTALLED)  ## Whole process and per step next to a plain script, with the breakdown, into outputs/bench/<date>_<time>.json [CORPUS=path] [ARGS=--quick]
	$(PYTHON) -m gptexp.bench $(if $(CORPUS),--corpus $(CORPUS),) $(ARGS)

gpu-check: $(INSTALLED)  ## On a CUDA machine (~8 min): checkpoint cost, exact resume, fp16, 2 GPUs; gpt2 side by side with the plain script (ms/step, MFU) [CORPUS=path]
	$(PYTHON) -m gptexp.gpucheck $(if $(CORPUS),--corpus $(CORPUS),)

test: $(INSTALLED)  ## Run the test suite (CPU only, two workers, a few minutes; PYTEST_ARGS="-n 0" runs it serially)
	$(PYTHON) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

lint: $(INSTALLED)  ## ruff lint and format check
	$(PYTHON) -m ruff check gptexp tests
	$(PYTHON) -m ruff format --check gptexp tests

format: $(INSTALLED)  ## ruff format and autofix
	$(PYTHON) -m ruff format gptexp tests
	$(PYTHON) -m ruff check --fix gptexp tests

clean:  ## Remove caches and build files (runs under outputs/ and .venv are kept)
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
