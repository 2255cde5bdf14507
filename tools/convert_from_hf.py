"""Convert a local Hugging Face Llama directory into a megamod checkpoint training continues from.

    python tools/convert_from_hf.py --hf path/to/llama --output runs/llama
    megamod-train --config runs/llama/config.yaml --checkpoint.load runs/llama --train.run_dir runs/ft \
        --data.paths data/mine_text_document --parallel.tp 2 ...            # any grid

Nothing is downloaded. The weights keep their dtype and bits (tools/convert_to_hf.py gives them
back identically); what megamod's model cannot compute (biases, rope scaling, another activation)
is refused naming the field. Layout: megamod/infer/hf_import.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf", required=True, help="local directory with config.json and *.safetensors")
    ap.add_argument("--output", required=True, help="megamod run directory to write")
    args = ap.parse_args(argv)
    from megamod.infer.hf_export import ExportError
    from megamod.infer.hf_import import convert

    if not os.path.isdir(args.hf):
        ap.error(f"--hf {args.hf}: no such directory (only local directories are converted)")
    try:
        report = convert(args.hf, args.output)
    except ExportError as e:
        print(f"convert_from_hf: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    if not report["tokenizer"]:
        print(f"note: {args.hf} has no sentencepiece tokenizer.model; give megamod-train data tokenized with this "
              f"model's tokenizer, and --data.tokenizer_model for generation", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
