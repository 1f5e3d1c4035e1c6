#!/usr/bin/env bash
# One short GPU check (the device machine has torch + CUDA but no hub access and no PyPI): install the carried
# wheels, run the CUDA tests, a bf16 training run through the CLI, and the benchmark on CUDA.
# Carried (git-ignored): .cache/gpu/{wheels,smollm2-arch,data}. Results go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index .cache/gpu/wheels/*.whl 2>&1 | tail -2
export IMSM_CACHE=$PWD/.cache PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, peft, hydra; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
echo "== tests (CUDA + model)"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_model.py 2>&1 | tail -4
echo "== bf16 training through the CLI on CUDA"
python3 -m imsm.train backbone=tiny_llama backbone.tokenizer=.cache/gpu/smollm2-arch data_dir=.cache/gpu/data \
  trainer.args.bf16=true trainer.args.max_steps=4 max_train_samples=32 max_eval_samples=8 eval.max_new_tokens=16 \
  trainer.args.disable_tqdm=true hydra.run.dir="$OUT/train_run" 2>&1 | tail -8
echo "== benchmark (random weights with SmolLM2-135M's architecture; EOS ignored, so timing is weight-independent)"
python3 -m imsm.bench --device cuda --random-init .cache/gpu/smollm2-arch --repeats 5 --out "$OUT" 2>&1 \
  | grep -v -i warn | tail -30
