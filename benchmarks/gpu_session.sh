#!/usr/bin/env bash
# One device call: install the carried wheels (deepspeed and the pure-Python packages it needs,
# which the GPU image lacks), then run the benchmarks named as arguments, logs under $OUT.
#   benchmarks/gpu_session.sh throughput   -> benchmarks/train_throughput.py (HF eager, HF compile, megamod)
#   benchmarks/gpu_session.sh mod          -> benchmarks/mod_speed.py (1b dense vs MoD; mod-compile: blocks compiled)
#   benchmarks/gpu_session.sh moba         -> benchmarks/moba_speed.py: check + the three issue-#7 points, dense
#                                             included (~150 s: kernels compiled first by 14 processes)
#   benchmarks/gpu_session.sh moba-sweep   -> moba_speed.py tile-config sweeps per phase (128K/512, 256K/4096)
#   benchmarks/gpu_session.sh moba-long    -> sweep at 256K/4096/12, then the 1M point with the best configs
#   benchmarks/gpu_session.sh moba-auto    -> dK/dV sweep at both chunk sizes, then the three points with the best
#   benchmarks/gpu_session.sh moba-gate    -> gate sweep (tf32x3, bf16split) at 32K and 128K, then those points
#   benchmarks/gpu_session.sh moba-ncu     -> Nsight Compute counters of the fwd, dQ and dK/dV kernels
#   benchmarks/gpu_session.sh engine       -> train_throughput.py b,c,d,dl + a profile of (c) (issue 9 engine work)
#   benchmarks/gpu_session.sh mod-ablate   -> mod_speed.py z0 mb8 with the in-step routing ablation (3 processes)
#   benchmarks/gpu_session.sh engine2      -> train_throughput.py b,c,c1 (the fast trainer next to the old ZeRO-1 one)
#   MB2B=4 GA2B=1 benchmarks/gpu_session.sh 2b -> train_throughput.py 2b (the 2b flavour through the trainer)
#   benchmarks/gpu_session.sh cp           -> cp_attention.py: CP attention's per-rank work vs one device (issue #20)
#   MGPU_NAME=long MGPU_ARGS='--which long --run-timeout 300' benchmarks/gpu_session.sh mgpu
#                                          -> multi_gpu.py with those flags on every GPU of the machine, results in
#                                             $OUT/$MGPU_NAME/multi_gpu.{md,json}, log $OUT/$MGPU_NAME.log (#10, #27)
#   LONG_RUNS=moba:262144,dense:262144 benchmarks/gpu_session.sh long
#                                          -> long_context.py: the 1b flavour at long sequences, MoBA vs dense (issue #21)
#   benchmarks/gpu_session.sh fused        -> train_throughput.py b,c,ca (c: master_fused, ca: the autocast recipe)
#                                             and mod_speed.py z0 mb8 x 2 with the in-step routing ablation
#   benchmarks/gpu_session.sh fp8-mod      -> speed_fp8_mod.py (issue #25, ~5 min on an H200): FP8 vs bf16 at 1b and
#                                             2b, MoD vs dense at 1b and 2b with each change on its own, fp8_check.py;
#                                             needs the torchao wheel in .whl
#   PARITY_DATA=data/stdlib_text_document PARITY_VOCAB=4096 benchmarks/gpu_session.sh fp8-parity
#                                          -> fp8_parity.py: 350m, 500 steps, bf16 then FP8 (~4 min on an H200;
#                                             carry data/: the .bin/.idx the prefix names)
#   benchmarks/gpu_session.sh generate     -> generate_speed.py: decode tokens/s MoD vs dense 1b (batch 1, 16; prompt 2K,
#                                             256 new), MoBA vs dense at a 128K prompt (prefill, per-token decode)
#   benchmarks/gpu_session.sh isoflop-data isoflop -> the sweep's corpus (examples/site_corpus.sh, ~2 min), then the
#                                             unfinished runs of benchmarks/results/isoflop/h200.json in plan order
#                                             until ISOFLOP_BUDGET_S (560) seconds of this call are used; results.csv
#                                             and curves.csv (the committed ones plus this call's runs) in $OUT/isoflop
#                                             (ISOFLOP_PIECES="1 2": only those pieces)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, triton, deepspeed; print('torch', torch.__version__, 'triton', triton.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1
python3 -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | grep -v "Failed to load" | tail -1
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
        mod-ablate) python3 benchmarks/mod_speed.py --compile --zero-stage 0 --micro-batch-size 8 --grad-accum 2 \
            --ablate-routing --json "$OUT/mod_ablate.json" 2>&1 | grep -v Warning | tee "$OUT/mod_ablate.log" ;;
        fused) python3 benchmarks/train_throughput.py --which b,c,ca --json "$OUT/throughput_fused.json" 2>&1 \
            | grep -v Warning | tee "$OUT/throughput_fused.log"
            python3 benchmarks/mod_speed.py --compile --zero-stage 0 --micro-batch-size 8 --grad-accum 2 \
            --ablate-routing --json "$OUT/mod_fused.json" 2>&1 | grep -v Warning | tee "$OUT/mod_fused.log" ;;
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
        moba-long) python3 benchmarks/moba_speed.py --warm 14 --check --sweep 262144:4096:12:fwd+dq+kv --auto \
            --points 1048576:4096:12 --dense-max 0 --json "$OUT/moba_long.json" 2>&1 \
            | grep --line-buffered -v Warning | tee "$OUT/moba_long.log" ;;
        moba-auto) python3 benchmarks/moba_speed.py --warm 14 --check --sweep 262144:4096:12:kv,131072:512:3:kv --auto \
            --points 32768:512:3,131072:512:3,1048576:4096:12 --dense-max "${MOBA_DENSE_MAX:-1048576}" \
            --json "$OUT/moba_auto.json" --md "$OUT/moba_auto.md" 2>&1 | grep --line-buffered -v Warning \
            | tee "$OUT/moba_auto.log" ;;
        moba-gate) python3 benchmarks/moba_speed.py --warm 14 --check --sweep 131072:512:3:gate,32768:512:3:gate --auto \
            --points 32768:512:3,131072:512:3 --dense-max 131072 --json "$OUT/moba_gate.json" 2>&1 \
            | grep --line-buffered -v Warning | tee "$OUT/moba_gate.log" ;;
        moba-ncu)  # hardware counters of the three attention kernels at 128K/4096/12 (one launch each)
            for k in _dkdv_kernel:1 _dq_past_kernel:1 _fwd_past_kernel:1; do
                ncu --clock-control none -k "regex:${k%%:*}" -s "${k##*:}" -c 1 --section SpeedOfLight \
                    --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats \
                    --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
                    python3 benchmarks/moba_speed.py --points 131072:4096:12 --reps 1 --dense-max 0 \
                    > "$OUT/ncu_${k%%:*}.txt" 2>&1
                grep -v "^==PROF==" "$OUT/ncu_${k%%:*}.txt" | grep -E "Duration|Throughput|Stall|Warp Cycles|Issued|Eligible|Registers|Occupancy|Shared Memory|Block Limit|Pipe|L2|L1|DRAM" | head -60
            done ;;
        generate) python3 benchmarks/generate_speed.py --json "$OUT/generate_speed.json" --md "$OUT/generate_speed.md" \
            2>&1 | grep --line-buffered -v Warning | tee "$OUT/generate_speed.log" ;;
        isoflop-data) bash examples/site_corpus.sh data 2>&1 | grep -v Warning | tee "$OUT/isoflop_data.log"
            cp data/site_corpus.json "$OUT/" ;;
        isoflop) mkdir -p "$OUT/isoflop"
            cp benchmarks/results/isoflop/results.csv benchmarks/results/isoflop/curves.csv "$OUT/isoflop/" 2>/dev/null
            python3 tools/isoflop.py run benchmarks/results/isoflop/h200.json --sweep-dir /tmp/isoflop-runs \
                --table "$OUT/isoflop/results.csv" --time-limit $((${ISOFLOP_BUDGET_S:-560} - SECONDS)) \
                ${ISOFLOP_PIECES:+--piece $ISOFLOP_PIECES} 2>&1 | tee "$OUT/isoflop/run.log"
            for d in /tmp/isoflop-runs/*/; do  # each run's log and metrics (KBs), for a look at what happened
                mkdir -p "$OUT/isoflop/runs/$(basename "$d")"
                cp "$d"metrics.jsonl "$d"logs/isoflop.out "$OUT/isoflop/runs/$(basename "$d")/" 2>/dev/null
            done ;;
        cp) python3 benchmarks/cp_attention.py --json "$OUT/cp_attention.json" 2>&1 | grep --line-buffered -v Warning \
            | tee "$OUT/cp_attention.log" ;;
        long) python3 benchmarks/long_context.py --runs "${LONG_RUNS:-moba:262144,dense:262144}" \
            --timeout "${LONG_TIMEOUT:-300}" --json "$OUT/long_context.json" 2>&1 | grep --line-buffered -v Warning \
            | tee "$OUT/long_context.log" ;;
        mgpu) python3 benchmarks/multi_gpu.py ${MGPU_ARGS:-} --out "$OUT/${MGPU_NAME:-mgpu}" 2>&1 \
            | grep --line-buffered -v Warning | tee "$OUT/${MGPU_NAME:-mgpu}.log" ;;
        fp8-mod) python3 benchmarks/speed_fp8_mod.py --budget-s "${FP8_BUDGET_S:-285}" --json "$OUT/speed_fp8_mod.json" \
            --profile "$OUT/mod_profile.txt" \
            2>&1 | grep --line-buffered -v -e Warning -e "Failed to load" | tee "$OUT/speed_fp8_mod.log" ;;
        fp8-parity) python3 benchmarks/fp8_parity.py --data "${PARITY_DATA:-data/stdlib_text_document}" \
            --vocab "${PARITY_VOCAB:-4096}" --json "$OUT/fp8_parity.json" --plot "$OUT/fp8_parity.png" 2>&1 \
            | grep --line-buffered -v -e Warning -e "Failed to load" | tee "$OUT/fp8_parity.log" ;;
        *) echo "unknown: $what" ;;
    esac
done
