"""Context-parallel attention's per-rank work on one GPU, against single-device attention (issue #20).

    python benchmarks/cp_attention.py --json out.json                 # one H200: the check + the points
    python benchmarks/cp_attention.py --tiny                          # CPU smoke test of the script

Each CP rank's attention is run one rank after another on the one GPU with the real code
(megamod/parallel/cp_attention.py's autograd functions and the same kernels), its collectives
replaced by ``OneGPUComm``: the all-gather hands over the whole sequence's K, V and block means
(prepared once, not timed: on real ranks that is the NCCL transfer), the reduce-scatter adds
the gathered keys' gradients into one buffer. So a rank's time is everything its attention
computes: the gate against the gathered block means, the own-block and picked-block pieces, the
merge, both backwards, and the zigzag layout copies around them; the transfers themselves are
not in it (the README's byte formula and the link bandwidth give them).

Reported per point: single-device fwd+bwd (ms), every rank's fwd+bwd, their sum / single and
slowest / mean (the issue's bars: ≤ 1.10 each at 1M, cp 8, MoBA 4096/12), per-rank attention
work from the gate plans, U (distinct remote blocks each rank's queries picked, random inputs),
and a check at a small point (bf16 ≤ 1e-2 relative: outputs, q/k/v gradients summed over
ranks; picks equal to the single-device gate's).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from megamod import compat  # noqa: E402
from megamod.model.attention import MobaAttention, SDPAttention  # noqa: E402
from megamod.ops import moba_attn_varlen  # noqa: E402
from megamod.ops.moba_pieces import block_means  # noqa: E402
from megamod.parallel.context import shard_sequence  # noqa: E402
from megamod.parallel.cp_attention import ContextParallelAttention  # noqa: E402
from megamod.parallel.cp_comm import CPComm  # noqa: E402


class OneGPUComm(CPComm):
    """CPComm of rank ``rank`` with the transfers replaced: all_gather returns the prepared
    whole-sequence tensor of that name, reduce_scatter adds into ``grads[name]`` and returns
    zeros (the other ranks' shares arrive there when they run). Bytes are counted as for real."""

    def __init__(self, rank, size, full, grads):
        super().__init__(None, rank, size)
        self.full, self.grads = full, grads  # grads None: timing only, nothing is kept

    def all_gather(self, x, name):
        self._count(name, x)
        return self.full[name]

    def reduce_scatter(self, y, name):
        self._count(name, y[:, : y.shape[1] // self.size])
        if self.grads is not None:
            self.grads[name] = self.grads[name] + y.float() if name in self.grads else y.float()
        b, s = y.shape[:2]
        return y.new_zeros(b, s // self.size, *y.shape[2:])


@contextlib.contextmanager
def dense_backend(name):
    """Run the dense CP pieces on the ATen op ``name`` ("cudnn", "flash"; None or "cpu": the default)."""
    saved = compat._dense_backend
    if name not in (None, "cpu"):
        compat._dense_backend = lambda index: name
    try:
        yield
    finally:
        compat._dense_backend = saved


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps, dev):
    fn()  # warm-up (compiles)
    out = []
    for _ in range(reps):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        out.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(out)


def inputs(s, h, hkv, d, dtype, dev, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    return [torch.randn(1, s, n, d, generator=g, device=dev, dtype=dtype) for n in (h, hkv, hkv, h)]


def single_device(kind, q, k, v, chunk, topk):
    """The attention of one device, (B, S, H, D) in and out."""
    if kind == "moba":
        cu = torch.tensor([0, q.shape[1]], dtype=torch.int32, device=q.device)
        return moba_attn_varlen(q[0], k[0], v[0], cu, q.shape[1], chunk, topk).unsqueeze(0)
    return SDPAttention()(q, k, v)


def rank_runs(kind, q, k, v, do, cp, chunk, topk, keep_grads=True):
    """Per rank: a closure running its fwd+bwd, and the gathered keys' gradient buffers."""
    full = {"k": k, "v": v}
    if kind == "moba":
        s = q.shape[1]
        cu = torch.tensor([0, s], dtype=torch.int32, device=q.device)
        full["means"] = block_means(k[0], cu, chunk).unsqueeze(0)
    runs = []
    for r in range(cp):
        grads: dict | None = {} if keep_grads else None
        comm = OneGPUComm(r, cp, full, grads)
        inner = MobaAttention(chunk, topk) if kind == "moba" else SDPAttention()
        attn = ContextParallelAttention(inner, comm).train()
        loc = [shard_sequence(t, cp, r).detach().requires_grad_() for t in (q, k, v)]
        do_r = shard_sequence(do, cp, r)

        def run(attn=attn, loc=loc, do_r=do_r, grads=grads):
            if grads is not None:
                grads.clear()
            for t in loc:
                t.grad = None
            attn(*loc).backward(do_r)

        runs.append((run, attn, loc, grads))
    return runs


def check(kind, s, cp, chunk, topk, dev, dtype, tol):
    """One point: the ranks' outputs and gradients against one device's; picks against its gate."""
    h, hkv, d = 4, 2, 64
    q, k, v, do = inputs(s, h, hkv, d, dtype, dev, seed=1)
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = single_device(kind, *x, chunk, topk)
    ref_g = torch.autograd.grad(ref, x, do)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    errs = {"out": 0.0, "dq": 0.0}
    dk = torch.zeros_like(k, dtype=torch.float32)
    dv = torch.zeros_like(dk)
    for r, (run, attn, loc, grads) in enumerate(rank_runs(kind, q, k, v, do, cp, chunk, topk)):
        with torch.no_grad():
            out = attn(*loc)
        errs["out"] = max(errs["out"], rel(out, shard_sequence(ref, cp, r)))
        run()
        errs["dq"] = max(errs["dq"], rel(loc[0].grad, shard_sequence(ref_g[0], cp, r)))
        own_k = torch.zeros_like(dk)
        c = s // (2 * cp)
        for j, g in enumerate((r, 2 * cp - 1 - r)):
            own_k[:, g * c:(g + 1) * c] = loc[1].grad[:, j * c:(j + 1) * c].float()
        dk += own_k + grads["dk"]
        own_v = torch.zeros_like(dv)
        for j, g in enumerate((r, 2 * cp - 1 - r)):
            own_v[:, g * c:(g + 1) * c] = loc[2].grad[:, j * c:(j + 1) * c].float()
        dv += own_v + grads["dv"]
    errs["dk"], errs["dv"] = rel(dk, ref_g[1]), rel(dv, ref_g[2])
    row = dict(kind=kind, S=s, cp=cp, chunk=chunk, topk=topk, dtype=str(dtype).split(".")[-1], **errs,
               ok=max(errs.values()) < tol)
    if kind == "moba":
        from megamod.ops.moba import moba_select_blocks
        from megamod.ops.moba_pieces import moba_gate_at

        cu = torch.tensor([0, s], dtype=torch.int32, device=dev)
        ref_sel = moba_select_blocks(q[0].float().cpu(), k[0].float().cpu(), cu.cpu(), chunk, topk).sort(-1).values
        means = block_means(k[0], cu, chunk)
        same = 0
        for r in range(cp):
            c = s // (2 * cp)
            rows = torch.cat([torch.arange(g * c, (g + 1) * c) for g in (r, 2 * cp - 1 - r)])
            cu_l = torch.tensor([0, c, 2 * c], dtype=torch.int32, device=dev)
            pos0 = torch.tensor([r * c, (2 * cp - 1 - r) * c], dtype=torch.int32, device=dev)
            sel = moba_gate_at(shard_sequence(q, cp, r)[0], means, cu_l, pos0,
                               torch.zeros(2, dtype=torch.int32, device=dev), chunk, topk)
            same += int((sel.long().sort(-1).values.cpu() == ref_sel[rows]).all(-1).sum())
        row["picks_equal"] = same / ref_sel[..., 0].numel()  # (query, head) rows whose picks agree
        row["ok"] = row["ok"] and row["picks_equal"] == 1.0
    return row


def point(kind, s, cp, chunk, topk, h, hkv, d, reps, dev, dtype):
    q, k, v, do = inputs(s, h, hkv, d, dtype, dev)
    x = [t.detach().requires_grad_() for t in (q, k, v)]

    def one():
        for t in x:
            t.grad = None
        single_device(kind, *x, chunk, topk).backward(do)

    row = dict(kind=kind, S=s, cp=cp, chunk=chunk, topk=topk, H=h, Hkv=hkv, D=d, single_ms=timed(one, reps, dev))
    x.clear()  # the single-device gradients go before the ranks run
    ranks = []
    for run, attn, _, _ in rank_runs(kind, q, k, v, do, cp, chunk, topk, keep_grads=False):
        ranks.append(timed(run, reps, dev))
        attn.log_metrics()  # drop the warm-up's
        run()
        m = attn.log_metrics()
        row.setdefault("work", []).append(m["cp_work"])
        if kind == "moba":
            row.setdefault("remote_blocks", []).append(m["cp_remote_blocks"])
            row["remote_total"] = m["cp_remote_total"]
        row.setdefault("bytes_per_rank", m["cp_bytes_k"] + m["cp_bytes_v"] + m.get("cp_bytes_means", 0)
                       + m["cp_bytes_dk"] + m["cp_bytes_dv"])
    row["rank_ms"] = ranks
    row["sum_over_single"] = sum(ranks) / row["single_ms"]
    row["slowest_over_mean"] = max(ranks) / statistics.mean(ranks)
    row["work_max_over_mean"] = max(row["work"]) / statistics.mean(row["work"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: small shapes, fp32, the torch paths")
    ap.add_argument("--points", default="moba:1048576:8:4096:12,moba:131072:8:512:3,dense:131072:8:0:0",
                    help="kind:S:cp:chunk:topk, comma-separated")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dense-backends", default="cudnn,flash",
                    help="ATen attention ops the dense CP pieces run on (CUDA), each checked and timed")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    dev = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    out = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
               device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", command=" ".join(sys.argv))
    checks = [("moba", 256, 4, 16, 3), ("dense", 256, 4, 0, 0)] if args.tiny else \
        [("moba", 32768, 4, 512, 3), ("moba", 65536, 8, 4096, 4), ("dense", 16384, 4, 0, 0)]
    backends = ["cpu"] if args.tiny else args.dense_backends.split(",")
    out["checks"], out["points"] = [], []
    for c in checks:
        for backend in backends if c[0] == "dense" else [None]:
            with dense_backend(backend):
                row = dict(check(*c, dev, dtype, 1e-5 if args.tiny else 1e-2), dense_backend=backend)
            out["checks"].append(row)
            print(json.dumps(row), flush=True)
    points = "moba:512:4:16:3,dense:256:4:0:0" if args.tiny else args.points
    h, hkv, d = (4, 2, 16) if args.tiny else (16, 16, 128)
    for spec in points.split(","):
        kind, s, cp, chunk, topk = spec.split(":")
        for backend in backends if kind == "dense" else [None]:
            with dense_backend(backend):
                row = dict(point(kind, int(s), int(cp), int(chunk), int(topk), h, hkv, d,
                                 1 if args.tiny else args.reps, dev, dtype), dense_backend=backend)
            out["points"].append(row)
            print(json.dumps(row), flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
