"""U: how many distinct remote MoBA blocks a CP rank's queries pick, on a trained model and on random
inputs (issue #20: fetch only the selected blocks, or all-gather K/V?). CPU.

    python benchmarks/cp_moba_locality.py --run-dir runs/moba_locality [--train-steps 400]

Trains (once; the run directory is reused) a debug-sized MoBA model on the demo corpus
(data/stdlib_text_document, built by `make demo`'s data steps) at seq 2048, block 64, topk 3,
then records q and k at every MoBA layer's inner attention on validation sequences and runs the
single-device gate (moba_select_blocks) on them. For cp in 2, 4, 8 and the zigzag layout, per
rank: the remote blocks its queries could pick (complete, in the past of some local query, not
held locally), U of them picked by some (query, head), and U_kv picked as (block, kv head) pairs
(what a fetch of K/V per kv head would move). The same on random q, k of the same shape. Bytes
a fetch would move against the all-gather's (cp − 1)/cp of the sequence's K/V:
fetch/all-gather = U_kv·B / ((cp − 1)/cp·S·Hkv).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import torch

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

SEQ, CHUNK, TOPK = 2048, 64, 3
FLAGS = ["--config", "examples/configs/debug.yaml", "--model.attention", "moba", "--moba.chunk_size", str(CHUNK),
         "--moba.topk", str(TOPK), "--model.max_seq_len", str(SEQ), "--train.seq_len", str(SEQ),
         "--train.micro_batch_size", "2", "--optim.zero_stage", "1", "--train.eval_interval", "0",
         "--checkpoint.interval", "0", "--logging.tensorboard", "false", "--train.progress", "off"]


def train(run_dir: str, steps: int) -> None:
    from megamod.train.ckpt_layout import find_latest_complete

    if find_latest_complete(os.path.join(run_dir, "checkpoints")):
        return
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=REPO)
    subprocess.run([sys.executable, "-m", "megamod.train", *FLAGS, "--train.steps", str(steps),
                    "--train.run_dir", run_dir], cwd=REPO, env=env, check=True)


@torch.no_grad()
def capture(run_dir: str, n_seq: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(q, k) of every MoBA layer on n_seq validation sequences: [n_seq, S, H, D], [n_seq, S, Hkv, D]."""
    from megamod.config import load_config
    from megamod.data.gpt_dataset import build_datasets, parse_data_paths
    from megamod.infer.generate import load_from_run
    from megamod.model.attention import MobaAttention

    model, cfg = load_from_run(run_dir)
    model.eval()
    got: dict[str, list] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, MobaAttention):
            mod.register_forward_hook(lambda m, a, o, name=name: got.setdefault(name, []).append((a[0], a[1])))
    c = load_config(None, FLAGS[2:] + ["--data.paths", "data/stdlib_text_document"])
    prefixes, weights = parse_data_paths(c.data.paths)
    _, valid = build_datasets(prefixes=prefixes, weights=weights, seq_len=SEQ, seed=c.train.seed,
                              split=c.data.split, num_samples=(1, n_seq), cache_dir=None)
    batch = torch.stack([torch.from_numpy(valid[i]) for i in range(n_seq)])
    model(batch[:, :-1])
    return [(torch.cat([x[0] for x in v]), torch.cat([x[1] for x in v])) for v in got.values()]


def locality(q: torch.Tensor, k: torch.Tensor, cp: int) -> dict:
    """Mean over sequences and ranks of U / remote-eligible and of the fetch/all-gather byte ratio."""
    from megamod.ops.moba import moba_select_blocks

    n, s, h, d = q.shape
    hkv = k.shape[2]
    c, nb = s // (2 * cp), s // CHUNK
    fracs, ratios = [], []
    for i in range(n):
        cu = torch.tensor([0, s], dtype=torch.int32)
        sel = moba_select_blocks(q[i], k[i], cu, CHUNK, TOPK)  # [S, H, KS] block ids
        for r in range(cp):
            chunks = (r, 2 * cp - 1 - r)
            rows = torch.cat([torch.arange(g * c, (g + 1) * c) for g in chunks])
            local = torch.zeros(nb, dtype=torch.bool)
            for g in chunks:
                local[g * c // CHUNK:(g + 1) * c // CHUNK] = True
            last = int(rows.max()) // CHUNK  # blocks before the latest local query's own block can be picked
            eligible = (~local[:last]).sum().item()
            if eligible == 0:
                continue
            s_r = sel[rows]  # [2c, H, KS]
            heads = torch.arange(h)[None, :, None].expand_as(s_r) // (h // hkv)
            ok = (s_r >= 0) & ~local[s_r.clamp(min=0)]
            u = torch.unique(s_r[ok]).numel()
            u_kv = torch.unique(s_r[ok] * hkv + heads[ok]).numel()
            fracs.append(u / eligible)
            ratios.append(u_kv * CHUNK / ((cp - 1) / cp * s * hkv))
    return dict(u_over_eligible=sum(fracs) / len(fracs), fetch_over_allgather=sum(ratios) / len(ratios))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", default="runs/moba_locality")
    ap.add_argument("--train-steps", type=int, default=400)
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    train(args.run_dir, args.train_steps)
    layers = capture(args.run_dir, args.sequences)
    out = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
               command=" ".join(sys.argv), seq=SEQ, chunk=CHUNK, topk=TOPK, train_steps=args.train_steps, rows=[])
    g = torch.Generator().manual_seed(0)
    for li, (q, k) in enumerate(layers):
        for cp in (2, 4, 8):
            trained = locality(q, k, cp)
            rand = locality(torch.randn(q.shape, generator=g), torch.randn(k.shape, generator=g), cp)
            row = dict(layer=li, cp=cp, trained=trained, random=rand)
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
