#!/usr/bin/env bash
# One device call: install the carried wheels (deepspeed and the pure-Python packages it needs,
# which the GPU image lacks), then run the benchmarks named as arguments, logs under $OUT.
#   benchmarks/gpu_session.sh throughput   -> benchmarks/train_throughput.py (HF eager, HF compile, megamod)
#   benchmarks/gpu_session.sh mod          -> benchmarks/mod_speed.py (1b dense vs MoD; mod-compile: blocks compiled)
#   benchmarks/gpu_session.sh moba         -> benchmarks/moba_speed.py: check + the three issue-#7 points, dense
#                                             included (~150 s: kernels compiled first by 14 processes)
#   benchmarks/gpu_session.sh moba-sweep   -> moba_speed.py tile-config sweeps per phase (128K/512, 256K/4096)
#   benchmarks/gpu_session.sh engine       -> train_throughput.py b,c,d,dl + a profile of (c) (issue 9 engine work)
#   benchmarks/gpu_session.sh engine2      -> train_throughput.py b,c,c1 (the fast trainer next to the old ZeRO-1 one)
#   MB2B=4 GA2B=1 benchmarks/gpu_session.sh 2b -> train_throughput.py 2b (the 2b flavour through the trainer)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, triton, deepspeed; print('torch', torch.__version__, 'triton', triton.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1
for what in "$@"; do
    case $what in
        throughput) python3 benchmarks/train_throughput.py --json "$OUT/throughput.json" 2>&1 | grep -v Warning | tee "$OUT/throughput.log" ;;
        throughput-split) python3 benchmarks/train_throughput.py --which b,c,d --json "$OUT/throughput_split.json" 2>&1 \
            | grep -v Warning | tee "$OUT/throughput_split.log" ;;
        mod-z0-mb8) python3 benchmarks/mod_speed.py --compile --zero-stage 0 --micro-batch-size 8 --grad-accum 2 \
            --json "$OUT/mod_speed_z0_mb8.json" 2>&1 | grep -v Warning | tee "$OUT/mod_speed_z0_mb8.log" ;;
        mod-compile-mb8) python3 benchmarks/mod_speed.py --compile --micro-batch-size 8 --grad-accum 2 \
            --json "$OUT/mod_speed_compile_mb8.json" 2>&1 | grep -v Warning | tee "$OUT/mod_speed_compile_mb8.log" ;;
        engine) python3 benchmarks/train_throughput.py --which b,c,d,dl --profile "$OUT/profile_c.txt" \
            --json "$OUT/engine.json" 2>&1 | grep -v Warning | tee "$OUT/engine.log" ;;
        engine2) python3 benchmarks/train_throughput.py --which b,c,c1 --json "$OUT/engine2.json" 2>&1 \
            | grep -v Warning | tee "$OUT/engine2.log" ;;
        2b) python3 benchmarks/train_throughput.py --which 2b --micro-batch-2b "${MB2B:-4}" --grad-accum-2b "${GA2B:-1}" \
            --json "$OUT/2b_mb${MB2B:-4}_ga${GA2B:-1}.json" 2>&1 | grep -v Warning | tee "$OUT/2b_mb${MB2B:-4}_ga${GA2B:-1}.log" ;;
        profile) python3 benchmarks/train_throughput.py --which c --steps 5 --profile "$OUT/profile_megamod.txt" \
            2>&1 | grep -v Warning | tail -60 ;;
        mod) python3 benchmarks/mod_speed.py --json "$OUT/mod_speed.json" 2>&1 | grep -v Warning | tee "$OUT/mod_speed.log" ;;
        mod-compile) python3 benchmarks/mod_speed.py --compile --json "$OUT/mod_speed_compile.json" 2>&1 \
            | grep -v Warning | tee "$OUT/mod_speed_compile.log" ;;
        moba) python3 benchmarks/moba_speed.py --warm 14 --check \
            --points 32768:512:3,131072:512:3,1048576:4096:12 --dense-max "${MOBA_DENSE_MAX:-1048576}" \
            --json "$OUT/moba_speed.json" --md "$OUT/moba_speed.md" 2>&1 | grep --line-buffered -v Warning \
            | tee "$OUT/moba_speed.log" ;;
        moba-sweep) python3 benchmarks/moba_speed.py --warm 14 --points '' \
            --sweep 131072:512:3,262144:4096:12:fwd+dq+kv 2>&1 | grep --line-buffered -v Warning \
            | tee "$OUT/moba_sweep.log" ;;
        *) echo "unknown: $what" ;;
    esac
done
