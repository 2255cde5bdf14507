#!/usr/bin/env bash
# The demo behind `make demo`: on a 2-core CPU, in about 3 minutes,
#   Python stdlib corpus -> sentencepiece tokenizer -> Megatron .bin/.idx -> debug model trained on
#   2 data-parallel ranks with ZeRO-2 -> evaluation, TensorBoard events, checkpoint -> a sample.
# Data steps are skipped when their outputs exist; the training run starts fresh each time.
# Extra arguments are passed to the trainer, e.g. `bash examples/demo.sh --train.steps 100`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=runs/demo
mkdir -p data
export OMP_NUM_THREADS=1  # one thread per rank: 2 ranks on 2 cores

stage() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }

if [[ ! -s data/stdlib.jsonl ]]; then
    stage "corpus: Python standard library sources and docstrings"
    $PY -m megamod.data.corpus --output data/stdlib.jsonl
fi
if [[ ! -s data/tok.model ]]; then
    stage "tokenizer: sentencepiece BPE, 4096 pieces"
    $PY tools/train_tokenizer.py --input data/stdlib.jsonl --model-prefix data/tok --vocab-size 4096
fi
if [[ ! -s data/stdlib_text_document.idx ]]; then
    stage "preprocess: jsonl -> data/stdlib_text_document.{bin,idx}"
    $PY tools/preprocess_data.py --input data/stdlib.jsonl --output-prefix data/stdlib --json-keys text \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/tok.model --append-eod --workers 2
fi

stage "train: debug flavour, 2 ranks, ZeRO-2"
rm -rf "$RUN"
$PY -m torch.distributed.run --standalone --nproc_per_node 2 -m megamod.train \
    --config examples/configs/debug.yaml --train.run_dir "$RUN" "$@"

stage "sample from the trained model"
$PY -m megamod.infer.generate --run-dir "$RUN" --prompt "def " --max-new-tokens 80

stage "result"
$PY - "$RUN" <<'PYEOF'
import json, sys
run = sys.argv[1]
val = [r for r in map(json.loads, open(f"{run}/metrics.jsonl")) if r["kind"] == "valid"]
first, last = val[0], val[-1]
drop = first["val_loss"] - last["val_loss"]
print(f"validation loss: step {first['step']} {first['val_loss']:.3f} -> step {last['step']} {last['val_loss']:.3f} "
      f"(drop {drop:.3f} nats)")
print(f"checkpoints: {run}/checkpoints   TensorBoard: tensorboard --logdir {run}/tensorboard")
sys.exit(0 if drop >= 1.0 else f"validation loss dropped by only {drop:.3f} nats (expected >= 1.0)")
PYEOF
