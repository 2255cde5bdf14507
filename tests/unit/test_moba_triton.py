"""The Triton MoBA kernels under TRITON_INTERPRET=1 (CPU, small shapes), against the dense
reference. The interpreter must be switched on before triton is imported, so the checks run in a
child process and report back as JSON; the rest of the pytest run keeps the compiled triton."""
import textwrap

import pytest

from _interp import run_interpreted

CHILD = textwrap.dedent(
    """
    import json, os
    assert os.environ["TRITON_INTERPRET"] == "1"
    import torch
    from megamod.ops.moba import moba_attn_varlen_reference, moba_select_blocks
    from megamod.ops import moba_triton as mt

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    res = {}
    # lens, chunk, topk, H, Hkv, D: partial last blocks, GQA, a chunk that is not a tile multiple
    # (case 3: more sequences than the block-table kernel takes per step; case 4: own block only)
    cases = [([37, 64, 5, 44], 8, 3, 4, 2, 16), ([70, 45], 16, 4, 2, 2, 32), ([90], 24, 2, 2, 1, 24),
             ([(i * 7) % 13 + 1 for i in range(37)], 4, 3, 2, 1, 16), ([33, 20], 8, 1, 2, 1, 16)]
    for i, (lens, B, topk, H, Hkv, D) in enumerate(cases):
        g = torch.Generator().manual_seed(i)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        T = int(cu[-1])
        q, k, v = (torch.randn(T, h, D, generator=g) for h in (H, Hkv, Hkv))
        do, dl = torch.randn(T, H, D, generator=g), torch.randn(T, H, generator=g)
        errs = []
        outs = []
        for fn in (mt.moba_attn_varlen_triton, moba_attn_varlen_reference):
            qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
            o, lse = fn(qq, kk, vv, cu, max(lens), B, topk, return_lse=True)
            gr = torch.autograd.grad((o * do).sum() + (lse * dl).sum(), (qq, kk, vv))
            # the output alone (no lse gradient: the kernel's backward gets dlse = None)
            gr_o = torch.autograd.grad((fn(qq, kk, vv, cu, max(lens), B, topk) * do).sum(), (qq, kk, vv))
            outs.append([o.detach(), lse.detach(), *gr, *gr_o])
        res[f"case{i}"] = [rel(a, b) for a, b in zip(*outs)]
        picks = {}
        pos = torch.cat([torch.arange(n) for n in lens])  # position inside the sequence
        want = torch.arange(topk - 1)[None, :] >= (topk - 1) - torch.clamp(pos // B, max=topk - 1)[:, None]
        slots_ok = []
        for prec in ("fma", "tf32x3"):
            cfg = dict(mt.INTERP_CFG, gate_prec=prec)
            raw = mt.moba_gate_triton(q, k, cu, max(lens), B, topk, cfg=cfg).long()
            # the slot passes rely on it: a row with p picks holds them in its last p slots
            slots_ok.append(bool(torch.equal(raw >= 0, want[:, None, :].expand_as(raw))))
            picks[prec] = raw.sort(-1).values
        ref = moba_select_blocks(q, k, cu, B, topk).sort(-1).values
        res[f"picks{i}"] = [bool(torch.equal(picks[p], ref)) for p in ("fma", "tf32x3")]
        res[f"slots{i}"] = slots_ok
    # the bf16 split of the block means (gate "bf16split"; its bf16 products run on the GPU only:
    # the interpreter's bf16 dot is not exact): hi + mid + lo must give back the fp32 mean
    from megamod.ops import moba_plan as mp
    g = torch.Generator().manual_seed(9)
    k = (torch.randn(200, 2, 32, generator=g) * 3).bfloat16()
    cu = torch.tensor([0, 120, 200], dtype=torch.int32)
    plan = mp._plan(k.new_empty(200, 4, 32), k, cu, 120, 16, 1, dict(mt.INTERP_CFG))
    nbt = plan["NBT"]
    parts = torch.empty(nbt, 2, 3, 32, dtype=torch.bfloat16)
    mean = torch.empty(nbt, 2, 32)
    for out, split in ((parts, True), (mean, False)):
        mp._block_mean_kernel[(nbt, 2)](k, out, plan["blk_start"], plan["blk_len"], k.stride(0), k.stride(1),
                                        out.stride(0), out.stride(1), out.stride(2) if split else 0, 32,
                                        BLOCK_D=32, BR=32, SPLIT=split)
    res["split_err"] = (parts.double().sum(2) - mean.double()).abs().max().item() / mean.abs().max().item()
    res["split_lo_used"] = bool(parts[:, :, 2].float().abs().max() > 0)
    # ties: see test_moba.tie_case (blocks 0 and 17 tie, as do 1..16 and 18; the interpreter's
    # gate scans 16 blocks per chunk, so the ties also cross chunks)
    import sys
    sys.path.insert(0, os.path.join(os.environ["MOBA_TEST_DIR"]))
    from test_moba import tie_case
    q, k, cu, B, want = tie_case()
    sel = mt.moba_gate_triton(q.float(), k.float(), cu, 80, B, 2)
    res["ties"] = [[int(sel[t, h, 0]), b] for (t, h), b in want.items()]
    print("RESULT" + json.dumps(res))
    """
)


@pytest.fixture(scope="module")
def interp():
    return run_interpreted(CHILD)


@pytest.mark.parametrize("case", [0, 1, 2, 3, 4])
def test_kernel_matches_reference_fwd_bwd(interp, case):
    # out, lse, dq, dk, dv (the loss also weights lse, so the dlse path is exercised), then dq, dk, dv
    # of a loss on the output alone (dlse = None)
    errs = interp[f"case{case}"]
    assert len(errs) == 8 and max(errs) < 1e-5, errs


@pytest.mark.parametrize("case", [0, 1, 2, 3, 4])
def test_gate_picks_match_torch_selection(interp, case):
    assert interp[f"picks{case}"] == [True, True]


@pytest.mark.parametrize("case", [0, 1, 2, 3, 4])
def test_gate_fills_the_last_slots_first(interp, case):
    # a row at position t has min(KS, t // chunk) picks, in its last slots (the forward and dQ
    # slot passes run from slot KS-1 down and let that pass write the fp32 state unread)
    assert interp[f"slots{case}"] == [True, True]


def test_gate_ties_pick_the_lower_block_index(interp):
    ties = interp["ties"]
    assert len(ties) == 16 and all(got == want for got, want in ties), ties
    assert {want for _, want in ties} == {0, 1}  # both ties are exercised


def test_block_mean_bf16_split_adds_up_to_the_fp32_mean(interp):
    # three bf16 parts carry the fp32 mean to ~2^-24 (and the third part is not always zero)
    assert interp["split_err"] < 2e-7 and interp["split_lo_used"], interp["split_err"]
