"""MasterAdamW (train.bf16_mode master_fused): bf16 weights, fp32 master weights and moments.

The CPU update (torch ops) is checked against torch's AdamW on fp32 copies; the Triton kernel is
checked against the CPU update under TRITON_INTERPRET=1 in a child process (the interpreter
must be on before triton is imported; the rest of the run keeps the compiled triton)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megamod.train.master_adamw import BLOCK, MasterAdamW

SHAPES = [(33, 70), (5000,), (16,), (3, 4096)]  # 4096 + 904 elements: a parameter over one chunk, padding
KW = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def _groups(params):  # decay on the first two, none on the rest
    return [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}]


def _grads(seed: int, scale: float) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + seed)
    return [(torch.randn(s, generator=gen) * scale).bfloat16() for s in SHAPES]


@pytest.mark.parametrize("max_norm", [1.0, 0.0])
def test_matches_torch_adamw_on_fp32_master_weights(max_norm, reference_adamw_step):
    """Four steps, the second with gradients of norm ~300 (clipped to 1 when max_norm is 1), two
    groups with different weight decay. The reference is torch's AdamW on fp32 copies, given the
    same bf16 gradients in fp32 and clip_grad_norm_ first: same formulas, fp32 rounding only. The
    bf16 weights are the master weights rounded (torch's round-to-nearest-even), bit for bit."""
    ours, ref = _params(), _params()
    opt = MasterAdamW(_groups(ours), max_norm=max_norm, **KW)
    ref_opt = torch.optim.AdamW(_groups(ref), foreach=False, **KW)
    assert all(p.dtype == torch.bfloat16 for p in ours)
    for step in range(4):
        grads = _grads(step, 3.0 if step == 1 else 0.01)
        for p, r, g in zip(ours, ref, grads):
            p.grad, r.grad = g, g.float()
        opt.step()
        norm = reference_adamw_step(ref, ref_opt, max_norm)
        torch.testing.assert_close(opt._global_grad_norm, norm)
        for p, r in zip(ours, ref):
            torch.testing.assert_close(opt.state[p]["master"], r.detach(), rtol=1e-6, atol=1e-6)
            assert torch.equal(p.detach(), opt.state[p]["master"].bfloat16())
    assert opt.state[ours[0]]["master"].dtype == torch.float32


def test_parameter_without_gradient_is_left_alone():
    params = _params()
    opt = MasterAdamW(_groups(params), max_norm=1.0, **KW)
    for p, g in zip(params, _grads(0, 0.1)):
        p.grad = g
    opt.step()
    before = {k: v.clone() for k, v in opt.state[params[2]].items() if k != "step"}
    w = params[2].detach().clone()
    for p, g in zip(params, _grads(1, 0.1)):
        p.grad = g
    params[2].grad = None
    opt.step()
    assert torch.equal(params[2].detach(), w)
    for k, v in before.items():
        assert torch.equal(opt.state[params[2]][k], v), k
    assert not torch.equal(opt.state[params[0]]["exp_avg"], torch.zeros(SHAPES[0]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_skips_the_whole_step(bad):
    params = _params()
    opt = MasterAdamW(_groups(params), max_norm=1.0, **KW)
    for p, g in zip(params, _grads(0, 0.1)):
        p.grad = g
    opt.step()
    snap = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params]
    for p, g in zip(params, _grads(1, 0.1)):
        p.grad = g
    params[1].grad[7] = bad
    opt.step()
    for p, (w, st) in zip(params, snap):  # weights, master weights, moments and the step count
        assert torch.equal(p.detach(), w)
        for k, v in st.items():
            assert torch.equal(opt.state[p][k], v), k
    for p, g in zip(params, _grads(2, 0.1)):
        p.grad = g
    opt.step()  # the next finite step updates again
    assert not torch.equal(params[0].detach(), snap[0][0])


def test_accumulation_sums_bf16_gradients_in_fp32_and_frees_them():
    """Three micro-batches: the buffer holds the fp32 sum of the three bf16 gradients (same order
    of additions, so exactly), each .grad is freed as soon as it is added, and the step uses the
    sum (its norm is the sum's norm)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    ref = torch.nn.Linear(64, 48).bfloat16()
    ref.load_state_dict(lin.state_dict())
    opt = MasterAdamW([{"params": list(lin.parameters())}], max_norm=0.0, accumulate=True, **KW)
    sums = [torch.zeros(p.shape) for p in ref.parameters()]
    for mb in range(3):
        x = torch.randn(16, 64).bfloat16()
        lin(x).float().square().mean().backward()
        assert all(p.grad is None for p in lin.parameters())
        ref(x).float().square().mean().backward()
        for s, p in zip(sums, ref.parameters()):
            s += p.grad.float()
            p.grad = None
    for s, g in zip(sums, opt._grads()):
        assert g.dtype == torch.float32 and torch.equal(g, s)
    opt.step()
    torch.testing.assert_close(opt._global_grad_norm, torch.linalg.vector_norm(torch.cat([s.flatten() for s in sums])))
    assert opt._grads() == [None, None]  # the next step starts a new sum


def test_state_dict_round_trip_continues_bit_for_bit():
    """Save after three steps, load into a fresh optimizer over freshly built parameters: the
    weights come back from the fp32 master weights, and the next two steps are identical."""
    a = _params()
    opt_a = MasterAdamW(_groups(a), max_norm=1.0, **KW)
    for step in range(3):
        for p, g in zip(a, _grads(step, 0.1)):
            p.grad = g
        opt_a.step()
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    b = _params(seed=7)  # other initial values: everything must come from the checkpoint
    opt_b = MasterAdamW(_groups(b), max_norm=1.0, **{**KW, "lr": 5.0})
    opt_b.load_state_dict(torch.load(buf, weights_only=False))
    assert opt_b.param_groups[0]["lr"] == KW["lr"]
    for step in range(3, 5):
        for params in (a, b):
            for p, g in zip(params, _grads(step, 0.1)):
                p.grad = g
        opt_a.step()
        opt_b.step()
        for pa, pb in zip(a, b):
            assert torch.equal(pa.detach(), pb.detach())
            assert torch.equal(opt_a.state[pa]["master"], opt_b.state[pb]["master"])


def test_loading_another_models_state_names_the_problem():
    a = _params()
    sd = MasterAdamW(_groups(a), max_norm=1.0, **KW).state_dict()
    other = [torch.nn.Parameter(torch.randn(s)) for s in [(33, 71), (5000,), (16,), (3, 4096)]]
    with pytest.raises(ValueError, match="written for another model"):
        MasterAdamW(_groups(other), max_norm=1.0, **KW).load_state_dict(sd)
    with pytest.raises(ValueError, match="other parameter groups"):
        MasterAdamW([{"params": _params()}], max_norm=1.0, **KW).load_state_dict(sd)


def test_switching_recipes_on_resume_is_refused():
    """A master_fused checkpoint into the autocast recipe's optimizer would keep only the bf16
    copies of the weights; an autocast checkpoint has no master weights to load. Both name the fix."""
    from megamod.train.clipping import ClippingAdamW

    a = _params()
    opt = MasterAdamW(_groups(a), max_norm=1.0, **KW)
    for p, g in zip(a, _grads(0, 0.1)):
        p.grad = g
    opt.step()
    with pytest.raises(ValueError, match="--train.bf16_mode master_fused"):
        ClippingAdamW(_groups(_params()), max_norm=1.0, **KW).load_state_dict(opt.state_dict())
    fp32 = _params()
    clipping = ClippingAdamW(_groups(fp32), max_norm=1.0, **KW)
    for p, g in zip(fp32, _grads(0, 0.1)):
        p.grad = g.float()
    clipping.step()
    with pytest.raises(ValueError, match="holds no fp32 master weights"):
        MasterAdamW(_groups(_params()), max_norm=1.0, **KW).load_state_dict(clipping.state_dict())


def test_parameters_start_on_chunk_boundaries():
    params = _params()
    opt = MasterAdamW(_groups(params), max_norm=1.0, **KW)
    base = opt._weight.data_ptr()
    offsets = [(p.data_ptr() - base) // 2 for p in params]
    # chunks: 2310 elements -> 1, 5000 -> 2, 16 -> 1, 12288 -> 3
    assert offsets == [0, BLOCK, 3 * BLOCK, 4 * BLOCK] and opt._master.numel() == 7 * BLOCK


CHILD = textwrap.dedent(
    """
    import json, os
    assert os.environ["TRITON_INTERPRET"] == "1"
    import torch
    from test_master_adamw import SHAPES, KW, _grads, _groups, _params
    from megamod.train.master_adamw import MasterAdamW

    res = {"master": [], "weight_ulps": [], "untouched": None, "skipped": None}
    a, b = _params(), _params()
    kern = MasterAdamW(_groups(a), max_norm=1.0, **KW)
    kern._update = kern._update_triton  # the kernel, on CPU tensors through the interpreter
    ref = MasterAdamW(_groups(b), max_norm=1.0, **KW)
    for step in range(4):
        grads = _grads(step, 3.0 if step == 1 else 0.01)
        if step == 3:
            grads[1][5] = float("nan")
        for params in (a, b):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            if step == 2:
                params[2].grad = None
        w2 = a[2].detach().clone()
        masters = [kern.state[p]["master"].clone() for p in a]
        kern.step(); ref.step()
        res["master"].append(max(((kern.state[p]["master"] - ref.state[q]["master"]).abs().max()
                                  / ref.state[q]["master"].abs().max()).item() for p, q in zip(a, b)))
        # the interpreter truncates fp32 -> bf16 where the GPU rounds to nearest: within one ulp
        res["weight_ulps"].append(max((p.detach().view(torch.int16).int() - kern.state[p]["master"].bfloat16()
                                       .view(torch.int16).int()).abs().max().item() for p in a))
        if step == 2:
            res["untouched"] = torch.equal(a[2].detach(), w2)
        if step == 3:
            res["skipped"] = all(torch.equal(kern.state[p]["master"], m) for p, m in zip(a, masters))
    print("RESULT" + json.dumps(res))
    """
)


@pytest.fixture(scope="module")
def interp():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([root, here, os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-W", "ignore", "-c", CHILD], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def test_kernel_matches_the_cpu_update(interp):
    """Four steps (one clipped, one with a parameter without gradient, one skipped for a NaN):
    master weights within fp32 rounding of the torch update, bf16 weights within one ulp (see
    the child), the gradient-less parameter untouched and the NaN step skipped by both."""
    assert max(interp["master"]) < 1e-6, interp["master"]
    assert max(interp["weight_ulps"]) <= 1, interp["weight_ulps"]
    assert interp["untouched"] and interp["skipped"]
