"""The TP plan applied to the meta-device model, without processes: what gets sharded, how, and
that a tp=N rank initialises to exactly its slice of the tp=1 weights. (Collectives are only
called in forward, so a placeholder group is enough to build and initialise.)"""

import pytest
import torch

from megamod.config import load_config
from megamod.model.gpt import build_model
from megamod.parallel.dims import ParallelDims
from megamod.parallel.tensor import TP_PLAN, Colwise, apply_tp, shard_dims, shard_tensor, universal_checkpoint_info

_TINY = ["--data.synthetic", "true", "--model.n_layers", "2", "--model.d_model", "64", "--model.n_heads", "4",
         "--model.n_kv_heads", "2", "--model.ffn_hidden", "128", "--model.vocab_size", "256"]


def _dims(tp: int, rank: int) -> ParallelDims:
    d = ParallelDims(tp=tp, cp=1, dp=1, pp=1, rank=rank)
    d.groups = {"tp": None}
    return d


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("tie", [False, True])
def test_tp_rank_initialises_to_its_slice_of_tp1(tp, tie):
    """Names unchanged, shapes split on the planned dim, values bit-equal to the tp=1 slice
    (init_weights draws every parameter full-size from a (seed, name) generator and keeps the
    ``tp_shard`` slice, which the TP layers re-tag after to_empty dropped it)."""
    from deepspeed.runtime.utils import is_model_parallel_parameter

    n_kv = "2" if tp == 2 else "4"  # GQA at tp=2 (1 kv head per rank); tp=4 needs 4 kv heads
    cfg = load_config(None, [*_TINY, "--model.n_kv_heads", n_kv, "--model.tie_embeddings", str(tie).lower()])
    full = dict(build_model(cfg).named_parameters())
    dims_of = shard_dims(build_model(cfg))
    for rank in range(tp):
        model = build_model(cfg, parallelize=lambda m: apply_tp(m, _dims(tp, rank)))
        params = dict(model.named_parameters())
        assert params.keys() == full.keys()
        for name, p in params.items():
            dim = dims_of[name]
            assert torch.equal(p, shard_tensor(full[name], dim, rank, tp)), name
            assert is_model_parallel_parameter(p) == (dim is not None), name
            if dim is not None:
                assert p.shape[dim] * tp == full[name].shape[dim] and p.tp_shard == (dim, rank, tp), name
        if tie:
            assert model.output.weight is model.tok_embeddings.weight
        # Tags survive dtype/device moves (nn.Module._apply may create new Parameter objects).
        assert is_model_parallel_parameter(model.to(torch.float64).layers["0"].attention.wq.weight)


def test_plan_shards_what_megatron_shards():
    cfg = load_config(None, _TINY)
    dims = shard_dims(build_model(cfg))
    expect = {"tok_embeddings.weight": 0, "output.weight": 0, "norm.weight": None,
              "layers.1.attention_norm.weight": None, "layers.1.ffn_norm.weight": None,
              "layers.1.attention.wq.weight": 0, "layers.1.attention.wk.weight": 0,
              "layers.1.attention.wv.weight": 0, "layers.1.attention.wo.weight": 1,
              "layers.1.feed_forward.w1.weight": 0, "layers.1.feed_forward.w3.weight": 0,
              "layers.1.feed_forward.w2.weight": 1}
    assert {k: dims[k] for k in expect} == expect
    info = universal_checkpoint_info(build_model(cfg))
    import re

    row = [n for n in dims if any(re.match(p, n) for p in info["parameter_with_row_parallelism_patterns"])]
    rep = [n for n in dims if any(re.match(p, n) for p in info["tp_replicated_parameter_patterns"])]
    assert sorted(row) == sorted(n for n, d in dims.items() if d == 1)
    assert sorted(rep) == sorted(n for n, d in dims.items() if d is None)


def test_plan_that_misses_a_layer_fails_loudly():
    cfg = load_config(None, _TINY)
    plan = {**TP_PLAN, "layers.*.attention.wqkv": Colwise()}  # a fused projection this model lacks
    with pytest.raises(ValueError, match=r"did not match every layer"):
        build_model(cfg, parallelize=lambda m: apply_tp(m, _dims(2, 0), plan=plan))
