#!/usr/bin/env bash
# Run one of the paper's tables as a Hydra multirun, then its report, in a sweep directory of known name.
#   scripts/sweep.sh table2_cpu                    -> multirun/table2_cpu/<time>/{<jobs>,report/}
#   scripts/sweep.sh table2 seed=1,2,3,4,5         (any extra Hydra overrides follow the experiment)
# The sweep goes on when a job fails (its metrics.json says so); the report shows that cell as failed.
set -euo pipefail
cd "$(dirname "$0")/.."
experiment=${1:?usage: scripts/sweep.sh EXPERIMENT [hydra overrides...]}
shift
PY=${PY:-.venv/bin/python}
sweep_dir=${SWEEP_DIR:-multirun/$experiment/$(date +%Y-%m-%d_%H-%M-%S)}
start=$(date +%s)
"$PY" -m imsm.train -m "experiment=$experiment" "hydra.sweep.dir=$sweep_dir" "$@"
echo "sweep took $(( $(date +%s) - start )) s: $sweep_dir"
"$PY" -m imsm.report "$sweep_dir" --table "$experiment"
