"""FP8 training (train.fp8, parallel/fp8.py) on CPU: which modules the swap converts (plain and
tensor-parallel linears), that parameter names, values and checkpoint keys stay as they are, the
refusals, and that a forward + backward in FP8 follows the fp32 model within FP8's precision.

torch >= 2.7 has a CPU ``torch._scaled_mm``, so torchao's float8 linears run here, slowly; the GPU
(compute capability 8.9+) is what the trainer requires (``check_fp8_support``) and what the
speed-ups need. The numerics tolerance: e4m3 keeps 3 mantissa bits (relative rounding error up to
2^-4, ~3.6% rms for uniformly spread mantissas) and e5m2 gradients 2 bits (~7% rms); a product's
output error is about the rms of its inputs' errors, so a gradient of a block weight ends ~5-10%
off in rms, a cosine similarity of 1 - ε²/2 ≈ 0.995-0.999 to the fp32 gradient (measured here:
0.993-0.996). We ask ≥ 0.98 for every block linear's weight gradient. The loss of this random-init
model barely moves (5e-5 measured): within 1e-3 relative. FP8 must also differ from the bf16
model: an unconverted model would match it bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megamod.config import ConfigError, load_config, validate
from megamod.model.gpt import build_model
from megamod.parallel.dims import ParallelDims
from megamod.parallel.fp8 import (FP8_LINEARS, Float8ColumnParallelLinear, Float8RowParallelLinear, apply_fp8,
                                  check_fp8_support, is_fp8_linear)
from megamod.parallel.loss import lm_loss
from megamod.parallel.tensor import apply_tp
from megamod.parallel.tp_layers import ColumnParallelLinear, VocabParallelEmbedding

# Three blocks: 0 dense, 1 routed (MoD, router + predictor), 2 dense; MoBA or dense attention.
_TINY = ["--data.synthetic", "true", "--model.n_layers", "3", "--model.d_model", "64", "--model.n_heads", "4",
         "--model.n_kv_heads", "2", "--model.ffn_hidden", "128", "--model.vocab_size", "256", "--train.seq_len", "64",
         "--mod.enabled", "true", "--mod.capacity", "0.25"]
_MOBA = ["--model.attention", "moba", "--moba.chunk_size", "16", "--moba.topk", "2"]


def _block_linears(n_layers: int) -> set[str]:
    return {f"layers.{i}.{name}" for i in range(n_layers) for name in FP8_LINEARS}


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_swap_converts_the_block_linears_only_and_keeps_the_checkpoint(recipe):
    """Block linears of dense and routed blocks (MoBA attention) become Float8Linear with the
    recipe's scaling; output, router, predictor, embedding and norms keep their classes; every
    parameter keeps its name, value and object (so optimizers and DeepSpeed see the same tensors),
    and the state dict has the same keys: FP8 adds no state to checkpoints."""
    from torchao.float8.float8_linear import Float8Linear

    cfg = load_config(None, [*_TINY, *_MOBA])
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    classes = {n: type(m) for n, m in model.named_modules()}
    swapped = apply_fp8(model, recipe)
    assert set(swapped) == _block_linears(3)
    for name, module in model.named_modules():
        if name in swapped:
            assert isinstance(module, Float8Linear), name
            scaling = module.config.cast_config_input.scaling_granularity.value
            assert scaling == {"tensorwise": "tensorwise", "rowwise": "axiswise"}[recipe], name
        else:
            assert type(module) is classes[name], name
    for kept in ("output", "layers.1.router", "layers.1.predictor.hidden", "layers.1.predictor.out"):
        assert type(model.get_submodule(kept)) is nn.Linear
    assert {n: id(p) for n, p in model.named_parameters()} == {n: id(p) for n, p in params.items()}
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_off_swaps_nothing_and_a_missing_linear_fails_loudly():
    cfg = load_config(None, _TINY)
    model = build_model(cfg)
    assert apply_fp8(model, "off") == []
    assert not any("Float8" in type(m).__name__ for m in model.modules())
    model.layers["2"].feed_forward.w2 = nn.Identity()  # a block linear that is not a Linear any more
    with pytest.raises(ValueError, match="left in high precision"):
        apply_fp8(model, "tensorwise")
    assert not is_fp8_linear("layers.1.router") and not is_fp8_linear("output")
    assert is_fp8_linear("layers.12.attention.wo") and not is_fp8_linear("layers.1.attention.wo.extra")


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_forward_backward_follows_fp32_within_fp8_precision(recipe):
    """bf16 weights, one forward + backward of the MoD model against the fp32 model (module
    docstring for the tolerance). That FP8 ran: bf16 alone keeps these cosines above 0.99995
    (measured), FP8 puts them ~5e-3 below 1; their mean shortfall must exceed 5e-4."""
    cfg = load_config(None, _TINY)
    batch = torch.randint(0, 256, (4, 65), generator=torch.Generator().manual_seed(0))

    def run(model):
        loss = lm_loss(model(batch[:, :-1]), batch[:, 1:])
        loss.backward()
        return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref = run(build_model(cfg))  # fp32
    fp8_model = build_model(cfg).to(torch.bfloat16)
    apply_fp8(fp8_model, recipe)
    loss, grads = run(fp8_model)
    assert loss == pytest.approx(ref_loss, rel=1e-3)
    cos = {n: F.cosine_similarity(grads[n + ".weight"].flatten(), ref[n + ".weight"].flatten(), dim=0).item()
           for n in _block_linears(3)}
    assert min(cos.values()) > 0.98, cos
    assert sum(1 - c for c in cos.values()) / len(cos) > 5e-4, cos


def _tp_dims(tp: int, rank: int) -> ParallelDims:
    d = ParallelDims(tp=tp, cp=1, dp=1, pp=1, rank=rank)
    d.groups = {"tp": None}  # collectives run only in forward: not called here
    return d


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_tp_linears_get_an_fp8_local_product(recipe):
    """Under TP the block linears are column/row-parallel modules, not nn.Linear: the swap changes
    their class (names, TP tags and shapes stay), the vocab-parallel output and embedding stay, and
    the FP8 local product of a shard follows its fp32 product (one e4m3 product: ~5% rms per
    element, so within 0.15 of the largest magnitude, and cosine > 0.99 over all outputs)."""
    cfg = load_config(None, [*_TINY, "--parallel.tp", "2"])
    model = build_model(cfg, parallelize=lambda m: apply_tp(m, _tp_dims(2, 1)))
    tags = {n: (p.shape, getattr(p, "tp_shard", None)) for n, p in model.named_parameters()}
    swapped = apply_fp8(model, recipe)
    assert set(swapped) == _block_linears(3)
    for name in swapped:
        module = model.get_submodule(name)
        row = name.endswith(("wo", "w2"))
        assert type(module) is (Float8RowParallelLinear if row else Float8ColumnParallelLinear), name
    assert type(model.output) is ColumnParallelLinear and type(model.tok_embeddings) is VocabParallelEmbedding
    assert {n: (p.shape, getattr(p, "tp_shard", None)) for n, p in model.named_parameters()} == tags
    assert model.layers["1"].attention.wo.weight.tensor_model_parallel
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1))
    for name in ("layers.1.attention.wq", "layers.2.feed_forward.w2"):
        module = model.get_submodule(name)
        inp = x if name.endswith("wq") else torch.randn(2, 16, module.weight.shape[1])
        out, ref = module.local_linear(inp), F.linear(inp, module.weight)
        assert ((out - ref).abs().max() / ref.abs().max()) < 0.15, name
        assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99, name
        assert not torch.equal(out, ref)


def test_refusals_name_the_flag(monkeypatch):
    """Config validation refuses what needs no device; check_fp8_support the device and torchao."""
    def refused(*flags):
        with pytest.raises(ConfigError, match="--train.fp8") as e:
            validate(load_config(None, [*_TINY, "--train.fp8", "tensorwise", *flags]))
        return str(e.value)

    assert "--train.device cpu" in refused("--train.device", "cpu")
    assert "--train.dtype fp32" in refused("--train.dtype", "fp32")
    assert "--optim.zero_stage 2" in refused("--optim.zero_stage", "3")
    assert "--model.ffn_hidden (per TP rank) = 120" in refused("--model.ffn_hidden", "120")
    assert "MoD block routes) = 56" in refused("--train.micro_batch_size", "4", "--mod.capacity", "0.234")
    validate(load_config(None, [*_TINY, "--train.fp8", "rowwise", "--train.device", "cuda"]))  # accepted

    with pytest.raises(ConfigError, match="this run is on cpu: set --train.fp8 off"):
        check_fp8_support(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match="A100-SXM4-80GB is sm_80: set --train.fp8 off"):
        check_fp8_support(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_support(torch.device("cuda", 0))  # Hopper: accepted
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'megamod\[fp8\]'"):
        check_fp8_support(torch.device("cuda", 0))
