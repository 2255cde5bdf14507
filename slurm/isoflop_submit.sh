#!/bin/bash
# Submit an isoFLOP manifest (tools/isoflop.py plan) as one job array (see isoflop_array.sbatch):
#   bash slurm/isoflop_submit.sh MANIFEST [--max-parallel N] [sbatch options ...] [-- overrides for every run]
# e.g. bash slurm/isoflop_submit.sh sweeps/1e18.json --max-parallel 4 --time=6:00:00 -- --optim.zero_stage 1
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
plan=${1:?usage: $0 MANIFEST [--max-parallel N] [sbatch options] [-- overrides]}
shift
[[ -f $plan ]] || { echo "manifest $plan not found" >&2; exit 2; }
max_parallel="" sbatch_opts=()
while (($#)); do
    case $1 in
        --max-parallel) max_parallel=%$2; shift 2 ;;
        --) shift; break ;;
        *) sbatch_opts+=("$1"); shift ;;
    esac
done
n=$(PYTHONPATH=$here/..${PYTHONPATH:+:$PYTHONPATH} python "$here/../tools/isoflop.py" show "$plan" --count) \
    || { echo "cannot read manifest $plan" >&2; exit 2; }
((n > 0)) || { echo "manifest $plan lists no runs" >&2; exit 2; }
sweep_dir=${MEGAMOD_SWEEP_DIR:-runs/isoflop/$(basename "${plan%.*}")}
job=$(sbatch --parsable --array="0-$((n - 1))$max_parallel" "${sbatch_opts[@]}" \
    "$here/isoflop_array.sbatch" "$plan" "$@")
echo "submitted $n runs of $plan as job array $job"
echo "watch:  squeue -j ${job%%;*}   |   tail -f $sweep_dir/*/logs/*.out"
echo "        tensorboard --logdir $sweep_dir"
echo "results: $sweep_dir/results.csv   (python tools/isoflop.py analyse --table $sweep_dir/results.csv --out DIR)"
