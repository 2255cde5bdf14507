"""Export a dense megamod checkpoint as a Hugging Face LlamaForCausalLM directory.

    python tools/convert_to_hf.py --run-dir runs/demo --output hf/demo            # verified in transformers
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('hf/demo')"

Any complete checkpoint (any TP/PP/DP grid or ZeRO stage). Writes config.json (built from the
run's config), sharded safetensors with their index, generation_config.json and the run's
sentencepiece tokenizer as LlamaTokenizerFast. Then loads the export in transformers and checks
its logits against megamod's on a random batch (fp32, 1e-4) and its tokenizer against
sentencepiece on sample texts; a mismatch fails the command (exit 1). Mixture-of-Depths and
MoBA checkpoints are refused with the reason (exit 2). Layout: megamod/infer/hf_export.py.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", required=True, help="run directory (or its checkpoints/, or a step_* directory)")
    ap.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    ap.add_argument("--output", required=True, help="directory to write (created)")
    ap.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                    help="weights' dtype; auto: the checkpoint's (fp32 master weights after training)")
    ap.add_argument("--tokenizer-model", help="sentencepiece model (default: the run's --data.tokenizer_model)")
    ap.add_argument("--no-tokenizer", action="store_true", help="export the weights only")
    ap.add_argument("--max-shard-size", type=float, default=5.0, help="GiB per safetensors shard")
    ap.add_argument("--no-verify", action="store_true", help="skip loading the export in transformers")
    args = ap.parse_args(argv)
    from megamod.infer.hf_export import ExportError, export
    from megamod.infer.load import load_state, load_tokenizer

    try:
        sd, raw, where = load_state(args.run_dir, args.tag)
        tokenizer = None
        if not args.no_tokenizer:
            try:
                tokenizer = load_tokenizer(where, tokenizer_model=args.tokenizer_model).model_path
            except FileNotFoundError as e:
                ap.error(f"{e}; or pass --no-tokenizer")
        report = export(sd, raw, args.output, dtype=args.dtype, tokenizer_model=tokenizer,
                        max_shard_bytes=int(args.max_shard_size * 2**30), verify=not args.no_verify)
    except FileNotFoundError as e:
        ap.error(str(e))
    except ExportError as e:
        print(f"convert_to_hf: error: {e}", file=sys.stderr)
        return 2 if "cannot export" in str(e) else 1
    print(json.dumps({"checkpoint": where, **report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
