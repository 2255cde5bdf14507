#!/usr/bin/env bash
# The isoFLOP sweep's corpus in one command: the installed packages' sources and docs
# (megamod/data/site_corpus.py) -> an 8192-piece sentencepiece BPE -> Megatron .bin/.idx.
#   bash examples/site_corpus.sh [DATA_DIR]        (default data/; PY=python3 on a machine without .venv)
#   ROOTS="dir1 dir2" bash examples/site_corpus.sh  (more package directories, e.g. from
#                                                    pip install --no-deps --target dir1 transformers==5.25.0)
# Writes DATA_DIR/site.jsonl, site_tok.model, site_text_document.{bin,idx} and site_corpus.json
# (documents, bytes, tokens, the .idx's sha1, seconds per stage). Steps whose outputs exist are
# skipped. Tokenizer training is deterministic (one thread, a seeded sample), so one machine (one
# image) always builds the same dataset: the runs of a sweep built in several sessions compare.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
DATA=${1:-data}
VOCAB=${VOCAB:-8192}
WORKERS=${WORKERS:-$(nproc)}
mkdir -p "$DATA"
stage() { printf '== %s (%s)\n' "$1" "$(date +%T)"; }
t0=$SECONDS
if [[ ! -s $DATA/site.jsonl ]]; then
    stage "corpus: standard library + site-packages sources and docs"
    roots=()
    for r in ${ROOTS:-}; do roots+=(--root "$r"); done
    $PY -m megamod.data.site_corpus --output "$DATA/site.jsonl" "${roots[@]}"
fi
t1=$SECONDS
if [[ ! -s $DATA/site_tok.model ]]; then
    stage "tokenizer: sentencepiece BPE, $VOCAB pieces, one thread (deterministic)"
    $PY tools/train_tokenizer.py --input "$DATA/site.jsonl" --model-prefix "$DATA/site_tok" --vocab-size "$VOCAB" \
        --input-sentence-size 50000 --num-threads 1
fi
t2=$SECONDS
if [[ ! -s $DATA/site_text_document.idx ]]; then
    stage "preprocess: $WORKERS workers -> $DATA/site_text_document.{bin,idx}"
    $PY tools/preprocess_data.py --input "$DATA/site.jsonl" --output-prefix "$DATA/site" --json-keys text \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA/site_tok.model" --append-eod \
        --workers "$WORKERS"
fi
t3=$SECONDS
$PY - "$DATA" $((t1 - t0)) $((t2 - t1)) $((t3 - t2)) <<'PYEOF'
import hashlib, json, os, sys
from megamod.data.indexed import IndexedDataset
data, *secs = sys.argv[1:]
prefix = os.path.join(data, "site_text_document")
ds = IndexedDataset(prefix)
with open(prefix + ".idx", "rb") as f:
    idx_sha1 = hashlib.sha1(f.read()).hexdigest()
docs = sum(1 for _ in open(os.path.join(data, "site.jsonl"), encoding="utf-8"))
info = {"documents": docs, "text_bytes": os.path.getsize(os.path.join(data, "site.jsonl")),
        "tokens": int(ds.sizes.sum()), "idx_sha1": idx_sha1,
        "seconds": dict(zip(["corpus", "tokenizer", "preprocess"], map(int, secs)))}
json.dump(info, open(os.path.join(data, "site_corpus.json"), "w"), indent=1)
print(f"site corpus: {docs} documents, {info['text_bytes'] / 1e6:.0f} MB of jsonl, {info['tokens'] / 1e6:.1f}M tokens "
      f"(idx sha1 {idx_sha1[:12]}); seconds {info['seconds']}")
if info["tokens"] < 100e6:
    print("note: under 100M tokens: this machine has too few packages installed for that (add directories of "
          "packages with ROOTS=...)")
PYEOF
