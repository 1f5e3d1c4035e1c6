#!/usr/bin/env bash
# Run one of the paper's tables as a Hydra multirun, then its report, in a sweep directory of known name.
#   scripts/sweep.sh table2                        -> multirun/table2/<time>/{<jobs>,report/}
#   scripts/sweep.sh table2_cpu                    (= experiment=table2 scale=cpu: SmolLM2-135M, small subsets)
#   scripts/sweep.sh table2 seed=1,2,3,4,5         (any extra Hydra overrides follow the experiment)
# NAME_cpu is experiment NAME with the CPU overlay (conf/scale/cpu.yaml), for every table and fig3.
# The sweep goes on when a job fails (its metrics.json says so); the report shows that cell as failed.
set -euo pipefail
cd "$(dirname "$0")/.."
experiment=${1:?usage: scripts/sweep.sh EXPERIMENT[_cpu] [hydra overrides...]}
shift
case $experiment in
  *_cpu) choices=("experiment=${experiment%_cpu}" "scale=cpu") ;;
  *) choices=("experiment=$experiment") ;;
esac
PY=${PY:-.venv/bin/python}
sweep_dir=${SWEEP_DIR:-multirun/$experiment/$(date +%Y-%m-%d_%H-%M-%S)}
start=$(date +%s)
"$PY" -m imsm.train -m "${choices[@]}" "hydra.sweep.dir=$sweep_dir" "$@"
echo "sweep took $(( $(date +%s) - start )) s: $sweep_dir"
"$PY" -m imsm.report "$sweep_dir" --table "$experiment"
