"""MoBA's two context-parallel pieces (megamod/ops/moba_pieces.py): their merge equals the single-device
MoBA on CPU, and the Triton pieces (TRITON_INTERPRET=1, small shapes) equal the torch pieces.

One "CP rank" is emulated on one process: a sequence of S tokens cut into 2·cp chunks, the rank's
two zigzag chunks as its local runs, the whole K as the all-gathered keys. fp32, 1e-5 relative
(the pieces split the same sums over disjoint key sets; rounding only)."""
import textwrap

import pytest

from _interp import run_interpreted
import torch

from megamod.ops.moba import moba_attn_varlen_gather
from megamod.ops.moba_pieces import (block_means, merge_pieces, moba_blocks_backward, moba_blocks_forward,
                                     moba_gate_at, moba_own_backward, moba_own_forward)

# (samples, S, H, Hkv, D, chunk, topk, cp, rank)
CASES = [(2, 64, 4, 2, 16, 4, 3, 2, 1), (1, 96, 2, 1, 16, 4, 4, 4, 0), (1, 64, 2, 2, 32, 8, 2, 2, 0)]


def emulate_rank(b, s, h, hkv, d, chunk, topk, cp, rank, seed=0):
    """Inputs of one CP rank's two pieces: its local runs and the gathered keys."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(b, s, n, d, generator=g) for n in (h, hkv, hkv, h))
    c = s // (2 * cp)
    chunks = (rank, 2 * cp - 1 - rank)
    loc = lambda x: torch.cat([x[:, j * c:(j + 1) * c] for j in chunks], 1).reshape(b * 2 * c, *x.shape[2:])  # noqa
    ql, kl, vl, dol = (loc(x) for x in (q, k, v, do))
    cu = torch.arange(0, b * 2 * c + 1, c, dtype=torch.int32)
    pos0 = torch.tensor([j * c for j in chunks] * b, dtype=torch.int32)
    nbs = s // chunk
    blk_first = torch.arange(b, dtype=torch.int32).repeat_interleave(2) * nbs
    means = block_means(k.reshape(b * s, hkv, d), torch.arange(0, b * s + 1, s, dtype=torch.int32), chunk)
    blk_start = torch.arange(b * nbs, dtype=torch.int32) * chunk
    return dict(q=q, k=k, v=v, do=do, ql=ql, kl=kl, vl=vl, dol=dol, cu=cu, c=c, pos0=pos0, blk_first=blk_first,
                means=means, blk_start=blk_start, kall=k.reshape(b * s, hkv, d), vall=v.reshape(b * s, hkv, d),
                loc=loc)


@pytest.mark.parametrize("case", CASES)
def test_merged_pieces_equal_single_device_moba(case):
    b, s, h, hkv, d, chunk, topk, cp, rank = case
    e = emulate_rank(*case)
    x = [t.reshape(b * s, *t.shape[2:]).clone().requires_grad_() for t in (e["q"], e["k"], e["v"])]
    cu_full = torch.arange(0, b * s + 1, s, dtype=torch.int32)
    ref, ref_lse = moba_attn_varlen_gather(*x, cu_full, s, chunk, topk, return_lse=True)
    grads = torch.autograd.grad((ref * e["do"].reshape(ref.shape)).sum(), x)
    sel = moba_gate_at(e["ql"], e["means"], e["cu"], e["pos0"], e["blk_first"], chunk, topk)
    o1, l1, st1 = moba_own_forward(e["ql"], e["kl"], e["vl"], e["cu"], e["c"], chunk)
    o2, l2, st2 = moba_blocks_forward(e["ql"], e["kall"], e["vall"], e["blk_start"], sel, chunk)
    out, lse = merge_pieces([(o1, l1), (o2, l2)])
    rel = lambda a, r: ((a - r).abs().max() / r.abs().max()).item()  # noqa: E731
    loc = lambda t: e["loc"](t.view(b, s, *t.shape[1:]))  # noqa: E731
    assert rel(out, loc(ref)) < 1e-5 and rel(lse, loc(ref_lse)) < 1e-5
    dq1, dk1, dv1 = moba_own_backward(e["dol"], out, lse, st1)
    dq2, dk2, dv2 = moba_blocks_backward(e["dol"], out, lse, st2)
    assert rel(dq1 + dq2, loc(grads[0])) < 1e-5
    # this rank's queries' share of dK/dV: the own piece's on local rows plus the gathered keys'
    # (the other ranks add theirs in the reduce-scatter); the reference of that share is the
    # gradient of this rank's rows' loss alone
    mask = loc(torch.ones(b * s, 1, 1)).bool()
    assert mask.sum() == 2 * b * e["c"]
    x2 = [t.detach().clone().requires_grad_() for t in x]
    o_ref = moba_attn_varlen_gather(*x2, cu_full, s, chunk, topk)
    w = torch.zeros_like(o_ref)
    idx = torch.cat([torch.arange(i * s + j * e["c"], i * s + (j + 1) * e["c"]) for i in range(b)
                     for j in (rank, 2 * cp - 1 - rank)])
    w[idx] = e["dol"]
    _, gk, gv = torch.autograd.grad((o_ref * w).sum(), x2)
    dk = dk2.clone()
    dv = dv2.clone()
    dk[idx] += dk1
    dv[idx] += dv1
    assert rel(dk, gk) < 1e-5 and rel(dv, gv) < 1e-5


CHILD = textwrap.dedent(
    """
    import json, os, sys
    assert os.environ["TRITON_INTERPRET"] == "1"
    import torch
    sys.path.insert(0, os.environ["MOBA_TEST_DIR"])
    from test_moba_pieces import CASES, emulate_rank
    from megamod.ops import moba_pieces as mp, moba_pieces_triton as mt
    from megamod.ops.moba_triton import INTERP_CFG

    rel = lambda a, r: ((a.float() - r.float()).abs().max() / r.float().abs().max().clamp(min=1e-30)).item()
    res = {}
    for i, case in enumerate(CASES):
        b, s, h, hkv, d, chunk, topk, cp, rank = case
        e = emulate_rank(*case)
        cfg = dict(INTERP_CFG)
        sel_t = mp.moba_gate_at(e["ql"], e["means"], e["cu"], e["pos0"], e["blk_first"], chunk, topk)
        sel_g = mt.gate_at(e["ql"], e["means"], e["cu"], e["pos0"], e["blk_first"], chunk, topk, cfg)
        means_g = mt.block_means(e["kall"], torch.arange(0, b * s + 1, s, dtype=torch.int32), chunk)
        o1, l1, st1 = mp.moba_own_forward(e["ql"], e["kl"], e["vl"], e["cu"], e["c"], chunk)
        o2, l2, st2 = mp.moba_blocks_forward(e["ql"], e["kall"], e["vall"], e["blk_start"], sel_t, chunk)
        O, L = mp.merge_pieces([(o1, l1), (o2, l2)])
        g1, gl1, gs1 = mt.own_forward(e["ql"], e["kl"], e["vl"], e["cu"], e["c"], chunk, cfg)
        g2, gl2, gs2 = mt.blocks_forward(e["ql"], e["kall"], e["vall"], e["blk_start"], sel_g, chunk, cfg)
        errs = [rel(g1, o1), rel(gl1, l1), rel(g2, o2), rel(torch.where(torch.isfinite(l2), gl2, 0),
                                                               torch.where(torch.isfinite(l2), l2, 0))]
        grads = [*mp.moba_own_backward(e["dol"], O, L, st1), *mp.moba_blocks_backward(e["dol"], O, L, st2)]
        grads_g = [*mt.own_backward(e["dol"], O, L, gs1), *mt.blocks_backward(e["dol"], O, L, gs2)]
        errs += [rel(a, r) for a, r in zip(grads_g, grads)]
        res[str(i)] = dict(errs=errs, picks=bool(torch.equal(sel_g.long().sort(-1).values, sel_t.long())),
                           no_pick_rows=bool(torch.equal(torch.isinf(gl2), torch.isinf(l2))),
                           means=rel(means_g, e["means"]))
    print("RESULT" + json.dumps(res))
    """
)


@pytest.fixture(scope="module")
def interp():
    return run_interpreted(CHILD)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_pieces_equal_torch_pieces(interp, case):
    r = interp[str(case)]
    # own o, lse; blocks o, lse; then dq, dk, dv of the own piece and of the blocks piece
    assert len(r["errs"]) == 10 and max(r["errs"]) < 1e-5, r["errs"]
    assert r["picks"] and r["no_pick_rows"] and r["means"] < 1e-6
