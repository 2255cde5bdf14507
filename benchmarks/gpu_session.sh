#!/usr/bin/env bash
# One device call: install the carried wheels (deepspeed and the pure-Python packages it needs,
# which the GPU image lacks), then run the benchmarks named as arguments, logs under $OUT.
#   benchmarks/gpu_session.sh throughput   -> benchmarks/train_throughput.py (HF eager, HF compile, megamod)
#   benchmarks/gpu_session.sh mod          -> benchmarks/mod_speed.py (1b dense vs MoD; mod-compile: blocks compiled)
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
        mod-compile-mb8) python3 benchmarks/mod_speed.py --compile --micro-batch-size 8 --grad-accum 2 \
            --json "$OUT/mod_speed_compile_mb8.json" 2>&1 | grep -v Warning | tee "$OUT/mod_speed_compile_mb8.log" ;;
        profile) python3 benchmarks/train_throughput.py --which c --steps 5 --profile "$OUT/profile_megamod.txt" \
            2>&1 | grep -v Warning | tail -60 ;;
        mod) python3 benchmarks/mod_speed.py --json "$OUT/mod_speed.json" 2>&1 | grep -v Warning | tee "$OUT/mod_speed.log" ;;
        mod-compile) python3 benchmarks/mod_speed.py --compile --json "$OUT/mod_speed_compile.json" 2>&1 \
            | grep -v Warning | tee "$OUT/mod_speed_compile.log" ;;
        *) echo "unknown: $what" ;;
    esac
done
