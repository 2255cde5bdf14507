"""The engine's precision choice and ClippingAdamW (clipping folded into the fused AdamW kernel)."""

from __future__ import annotations

import pytest
import torch

from megamod.config import load_config
from megamod.parallel.dims import ParallelDims
from megamod.train.clipping import ClippingAdamW
from megamod.train.engine import clips_in_optimizer, deepspeed_config, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(7, 5), (5,), (3, 4, 2)]]


def _set_grads(params, seed: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * scale


@pytest.mark.parametrize("max_norm, scale", [(0.5, 3.0), (100.0, 1.0), (0.0, 3.0)])
def test_clipping_adamw_matches_clip_grad_norm_then_adamw(max_norm, scale, reference_adamw_step):
    """Three steps of ClippingAdamW == torch's clip_grad_norm_ (DeepSpeed's formula: grads ·
    min(1, max_norm/(‖g‖+1e-6))) then a plain AdamW; max_norm 0 means no clipping. Gradients
    of norm ~3·sqrt(67) ≈ 25 make clipping to 0.5 active, to 100 inactive."""
    ours, ref = _params(0), _params(0)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = ClippingAdamW([{"params": ours[:2]}, {"params": ours[2:], "weight_decay": 0.0}], max_norm=max_norm, **kw)
    ref_opt = torch.optim.AdamW([{"params": ref[:2]}, {"params": ref[2:], "weight_decay": 0.0}], foreach=False, **kw)
    for step in range(3):
        _set_grads(ours, step, scale)
        _set_grads(ref, step, scale)
        opt.step()
        norm = reference_adamw_step(ref, ref_opt, max_norm)
        torch.testing.assert_close(opt._global_grad_norm, norm)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_clipping_adamw_skips_a_non_finite_step(bad):
    params = _params(1)
    opt = ClippingAdamW(params, max_norm=1.0, lr=1e-2)
    _set_grads(params, 0, 1.0)
    opt.step()
    before = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    _set_grads(params, 1, 1.0)
    params[1].grad[2] = bad
    opt.step()
    assert not torch.isfinite(opt._global_grad_norm)
    for p, b, s in zip(params, before, state):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)
        for k, v in s.items():  # moments untouched, step count rolled back
            torch.testing.assert_close(opt.state[p][k], v, rtol=0, atol=0)
    _set_grads(params, 2, 1.0)  # and the next finite step updates again
    opt.step()
    assert not torch.equal(params[0].detach(), before[0])


@pytest.mark.parametrize("argv, device, world, expected", [
    ([], CPU, 1, "fp32"),
    ([], CUDA, 1, "bf16"),  # ZeRO-1 default: bf16 weights, fp32 master weights in DeepSpeed
    (["--optim.zero_stage", "0"], CUDA, 1, "master_fused"),  # one rank: MasterAdamW
    (["--optim.zero_stage", "0"], CUDA, 2, "autocast"),  # gradients to reduce: DeepSpeed's autocast path
    (["--optim.zero_stage", "0", "--train.bf16_mode", "master_weights"], CUDA, 1, "bf16"),
    (["--optim.zero_stage", "2", "--train.bf16_mode", "autocast"], CUDA, 4, "autocast"),
    (["--optim.zero_stage", "0", "--train.dtype", "bf16"], CPU, 1, "master_fused"),
    (["--optim.zero_stage", "0", "--train.dtype", "bf16", "--train.bf16_mode", "autocast"], CPU, 1, "autocast"),
    (["--optim.zero_stage", "0", "--train.dtype", "fp32"], CUDA, 1, "fp32"),
])
def test_resolve_precision(argv, device, world, expected):
    assert resolve_precision(load_config(None, ["--data.synthetic", "true", *argv]), device, world) == expected


def test_deepspeed_config_for_autocast_and_optimizer_clipping():
    cfg = load_config(None, ["--data.synthetic", "true", "--optim.zero_stage", "0", "--optim.grad_clip", "0.5"])
    one = ParallelDims(tp=1, cp=1, dp=1, pp=1, rank=0)
    assert clips_in_optimizer(cfg, one)
    assert clips_in_optimizer(cfg, ParallelDims(tp=2, cp=1, dp=2, pp=2, rank=0))  # norm reduced over TP × PP
    assert clips_in_optimizer(cfg, ParallelDims(tp=1, cp=2, dp=1, pp=1, rank=0))  # grads reduced over dp·cp first
    ds = deepspeed_config(cfg, one, "autocast", optimizer_clips=True)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and not ds["bf16"]["enabled"]
    assert ds["gradient_clipping"] == 0.0  # the optimizer clips; DeepSpeed must not clip again
    ds = deepspeed_config(cfg, one, "bf16")
    assert ds["bf16"]["enabled"] and not ds["torch_autocast"]["enabled"] and ds["gradient_clipping"] == 0.5


def test_deepspeed_throughput_timer_is_off():
    """DeepSpeed's throughput timer (on by default) synchronises the device at every forward and
    step() call; read through DeepSpeed's own parser, our config turns it off."""
    from deepspeed.utils.config import get_timers_config

    cfg = load_config(None, ["--data.synthetic", "true"])
    timers = get_timers_config(deepspeed_config(cfg, ParallelDims(tp=1, cp=1, dp=1, pp=1, rank=0), "bf16"))
    assert not timers.enabled and not timers.synchronized
    assert get_timers_config({}).synchronized  # the default we turn off
