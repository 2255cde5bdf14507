"""The chunked loss (parallel/loss.py, train.loss_chunk_tokens): output projection + cross-entropy a
chunk of tokens at a time, recomputed in backward, equals the full-logits loss, and holds at most a
quarter of its memory.

Equality, fp32, 1e-6 relative: the chunks sum the same per-token losses in another grouping (and
the weight gradient in as many partial products), ~1e-7. At tp 1 in this process; at tp 2 on two
gloo ranks, each holding half of the vocabulary's rows, against the full-logits loss on one device.
Memory: 32768 tokens, vocabulary 4096, d 64, fp32, in fresh processes: the peak resident memory
each adds over its inputs (the full version keeps (N, V) logits, their log-softmax and gradient:
~1.5 GiB; chunks of 2048 tokens, 1/16 of that).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch
import torch.distributed as dist

from _harness import run_distributed


def _inputs(n=300, d=24, v=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, n // 2, d, generator=g), torch.randn(v, d, generator=g) * 0.3, \
        torch.randint(0, v, (2, n // 2), generator=g)


def _full(h, w, t):
    from megamod.parallel.loss import lm_loss

    return lm_loss(h @ w.T, t)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_chunked_equals_full_at_tp1():
    from megamod.parallel.loss import ChunkedLMLoss

    h, w, t = _inputs()
    out = torch.nn.Linear(24, 64, bias=False)
    with torch.no_grad():
        out.weight.copy_(w)
    x = h.clone().requires_grad_()
    ref = _full(x, out.weight, t)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x, out.weight))
    for chunk in (7, 64, 1000):  # uneven, even, one chunk
        x2 = h.clone().requires_grad_()
        loss = ChunkedLMLoss(out, chunk)(x2, t)
        gx, gw = torch.autograd.grad(loss, (x2, out.weight))
        assert abs(loss.item() - ref.item()) <= 1e-6 * ref.item()
        assert _rel(gx, gx_ref) < 1e-6 and _rel(gw, gw_ref) < 1e-6


def _tp2(rank: int, world_size: int) -> dict:
    from megamod.parallel.loss import ChunkedLMLoss, vocab_parallel_lm_loss

    h, w, t = _inputs()
    x = h.clone().requires_grad_()
    w_full = w.clone().requires_grad_()
    ref = _full(x, w_full, t)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x, w_full))
    shard = torch.nn.Linear(24, 32, bias=False)  # this rank's 32 of the 64 vocabulary rows
    with torch.no_grad():
        shard.weight.copy_(w.chunk(2)[rank])
    out = {}
    for name, fn in (("full_tp", lambda y: vocab_parallel_lm_loss(y @ shard.weight.T, t, dist.group.WORLD)),
                     ("chunked_tp", lambda y: ChunkedLMLoss(shard, 37, dist.group.WORLD)(y, t))):
        y = h.clone().requires_grad_()
        loss = fn(y)
        gx, gw = torch.autograd.grad(loss, (y, shard.weight))
        dist.all_reduce(gx)  # the TP region's entry (copy_to_tp) sums the input's gradient over the shards
        out[name] = (abs(loss.item() - ref.item()) / ref.item(), _rel(gx, gx_ref), _rel(gw, gw_ref.chunk(2)[rank]))
    return out


def test_chunked_equals_full_at_tp2():
    for res in run_distributed(_tp2, 2):
        for name, errs in res.items():
            assert max(errs) < 1e-6, (name, errs)


_MEMORY = textwrap.dedent("""
    import json, resource, sys, torch
    from megamod.parallel.loss import ChunkedLMLoss, lm_loss
    torch.set_num_threads(2)
    n, d, v = 32768, 64, 4096
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, n, d, generator=g).requires_grad_()
    out = torch.nn.Linear(d, v, bias=False)
    t = torch.randint(0, v, (1, n), generator=g)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.argv[1] == "full":
        loss = lm_loss(out(h), t)
    else:
        loss = ChunkedLMLoss(out, 2048)(h, t)
    loss.backward()
    print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base}))
""")


def test_chunked_loss_holds_under_a_quarter_of_the_full_logits_memory():
    peaks = {}
    for kind in ("full", "chunked"):
        p = subprocess.run([sys.executable, "-c", _MEMORY, kind], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        peaks[kind] = json.loads(p.stdout.strip().splitlines()[-1])["peak_kib"]
    assert peaks["full"] > 32768 * 4096 * 4 * 2 / 1024  # at least the logits and their gradient
    assert peaks["chunked"] <= peaks["full"] / 4, peaks
