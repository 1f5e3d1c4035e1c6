#!/usr/bin/env bash
# Does the gate keep what the model knew? The powered CPU experiment of issue 17, pre-registered in
# docs/results-forgetting-cpu-design.md: SmolLM2-135M-Instruct + LoRA on the first 640 MRPC pairs, four arms paired
# by seed, forgetting scored by likelihood on 500 WebQ + 500 FreebaseQA questions; then the analysis and
# docs/results-forgetting-cpu.md.
#   scripts/forgetting_cpu.sh                      (after `make setup`; ~90 min on 2 cores: see the document)
#   REPORT_ONLY=1 ROOT=multirun/forgetting_cpu/<time> scripts/forgetting_cpu.sh   (re-generate the document only)
#   STAGES="fixed" ROOT=... scripts/forgetting_cpu.sh                              (run, or re-run, some stages)
# Extra arguments are Hydra overrides given to every training job (e.g. a smoke test's smaller sizes).
# Stages (each one Hydra multirun, timed into $ROOT/stages.md):
#   vanilla  gate=none, seeds 1-4, also scored after step 20 (eval.at_steps) for the matched-plasticity curve
#   imsm     gate=query_aware (gate lr 1e-3), seeds 1-4
#   fixed    gate=fixed (the 0.5 mix, "w/o gate"), seeds 1-2
#   fast     gate=query_aware with a higher gate lr, chosen on held-out slices (MRPC dev[:200], WebQ train[:200]):
#            the first of GATE_LRS whose seed-1 run moves the mean gate value by >= 0.05 from 0.5 on either slice;
#            that run is the arm's seed 1, then seed 2 is trained with the chosen lr
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-1,2,3,4}
SMALL_SEEDS=${SMALL_SEEDS:-1,2}
GATE_LRS=${GATE_LRS:-1e-2 3e-2 1e-1}
HELDOUT=${HELDOUT:-200}
DOCS=${DOCS:-docs}
root=${ROOT:-multirun/forgetting_cpu/$(date +%Y-%m-%d_%H-%M-%S)}
export IMSM_DATA_DIR=${IMSM_DATA_DIR:-$(cd .. && pwd)/shared/data} WANDB_MODE=${WANDB_MODE:-offline}
mkdir -p "$root"
common=(experiment=forgetting_cpu "eval.original_cache=$root/original")
greedy_too='eval.scoring_by_dataset={webq:both,freebaseqa:both}'   # secondary: greedy "contains" on the same questions

stage() {  # stage NAME [overrides...]: one Hydra multirun into $root/NAME, timed
  local name=$1 start
  shift
  start=$(date +%s)
  "$PY" -m imsm.train -m "hydra.sweep.dir=$root/$name" "${common[@]}" "$@"
  sed -i "/^| $name |/d" "$root/stages.md" 2>/dev/null || true
  echo "| $name | \`python -m imsm.train -m experiment=forgetting_cpu $*\` | $(($(date +%s) - start)) |" >> "$root/stages.md"
}

heldout_gate() {  # heldout_gate RUN_DIR OUT: likelihood on the held-out slices; prints the larger |mean g - 0.5|
  local run=$1 out=$2
  "$PY" -m imsm.evaluate "run_dir=$run" "out_dir=$out/mrpc_dev" 'datasets=[mrpc]' split=dev "limit=$HELDOUT" \
    scoring=likelihood answer_eos=false batch_size=32 autocast=bf16 max_output_length=8 > /dev/null
  "$PY" -m imsm.evaluate "run_dir=$run" "out_dir=$out/webq_train" 'datasets=[webq]' "split=train[:$HELDOUT]" \
    scoring=likelihood answer_eos=false batch_size=32 autocast=bf16 > /dev/null
  "$PY" - "$out" <<'EOF'
import json, sys
from pathlib import Path
moved = [abs(json.loads(p.read_text())["metrics"]["gate"]["mean"] - 0.5) for p in Path(sys.argv[1]).glob("*/*/metrics.json")]
print(f"{max(moved):.4f}")
EOF
}

for name in ${STAGES:-vanilla imsm fixed fast}; do
  [[ -n "${REPORT_ONLY:-}" ]] && break
  case $name in
    vanilla) stage vanilla gate=none "seed=$SEEDS" 'eval.at_steps=[20]' "$greedy_too" "$@" ;;
    imsm) stage imsm gate=query_aware "seed=$SEEDS" "$greedy_too" "$@" ;;
    fixed) stage fixed gate=fixed "seed=$SMALL_SEEDS" eval.compare_base=false "$@" ;;
    fast)
      start=$(date +%s)
      rm -rf "$root/fast" "$root/select.md"
      chosen=""
      for lr in $GATE_LRS; do
        "$PY" -m imsm.train -m "hydra.sweep.dir=$root/select/lr$lr" "${common[@]}" gate=query_aware \
          "gate.lr=$lr" "seed=${SMALL_SEEDS%%,*}" eval.compare_base=false "$@"
        job=$(find "$root/select/lr$lr" -mindepth 1 -maxdepth 1 -type d -name '0_*')
        moved=$(heldout_gate "$job" "$root/select/lr$lr/heldout")
        echo "| $lr | $moved |" >> "$root/select.md"
        if "$PY" -c "import sys; sys.exit(0 if float('$moved') >= 0.05 else 1)"; then chosen=$lr && break; fi
      done
      chosen=${chosen:-$lr}   # none moved the gate by 0.05: the largest candidate (the document says so)
      echo "$chosen" > "$root/fast_gate_lr.txt"
      mkdir -p "$root/fast"
      ln -s "../select/lr$chosen/$(basename "$job")" "$root/fast/seed${SMALL_SEEDS%%,*}"
      rest=${SMALL_SEEDS#*,}
      if [[ "$rest" != "$SMALL_SEEDS" ]]; then
        "$PY" -m imsm.train -m "hydra.sweep.dir=$root/fast/rest" "${common[@]}" gate=query_aware \
          "gate.lr=$chosen" "seed=$rest" eval.compare_base=false "$@"
      fi
      sed -i "/^| fast |/d" "$root/stages.md" 2>/dev/null || true
      echo "| fast | gate lr chosen on held-out slices ($GATE_LRS), then \`gate=query_aware gate.lr=$chosen seed=$rest\` | $(($(date +%s) - start)) |" >> "$root/stages.md"
      ;;
    *) echo "unknown stage $name (vanilla, imsm, fixed, fast)" >&2 && exit 2 ;;
  esac
done

"$PY" -m imsm.report.forgetting "$root" --docs "$DOCS"
echo "done: $root -> $DOCS/results-forgetting-cpu.md"
