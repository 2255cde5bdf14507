"""Tensor (and sequence) parallel model == the single-device model: logits, loss, every gradient.

One 4-rank gloo run covers tp=4 (dp=1) and tp=2 (dp=2: two independent TP pairs), each with and
without sequence parallelism; every rank also builds the single-device model (same seed, so the
same weights) and compares against it locally. Tolerance: 1e-5 of the largest reference
magnitude (``_rel``). Derivation: the sharded model computes the same sums in another order
(partial matmuls over d/tp or F/tp summed by all-reduce / reduce-scatter, the softmax
normaliser summed over V/tp shards), so each result differs by fp32 rounding, about
sqrt(K)·2^-24 relative for a K-term sum (K ≤ 256 here): ~1e-7 per op, ~1e-6 after a few layers
and the backward pass; 1e-5 leaves margin and is still far below any sharding bug (a missing
all-reduce, a wrong shard, a doubled gradient are O(1) relative).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from _harness import run_distributed

_BASE = ["--data.synthetic", "true", "--model.n_layers", "2", "--model.d_model", "64", "--model.n_heads", "4",
         "--model.ffn_hidden", "128", "--model.vocab_size", "256", "--train.seq_len", "16"]
# (tp, sequence_parallel, extra flags): GQA where tp allows it (tp=2: 2 kv heads, one per rank)
# and tied embeddings once, so the vocab-parallel embedding and output share one sharded weight.
# MoD (block 1 routed, k = 4 of 16 tokens, router BCE + predictor losses injected in backward):
# under SP the selected tokens are spread over the ranks' sequence shards (routed_sp.py).
_MOD = ["--mod.enabled", "true", "--mod.capacity", "0.25", "--mod.aux_loss_weight", "0.1", "--mod.gate", "sigmoid"]
_CASES = [(4, False, ["--model.n_kv_heads", "4"]), (4, True, ["--model.n_kv_heads", "4"]),
          (2, False, ["--model.n_kv_heads", "2", "--model.tie_embeddings", "true"]),
          (2, True, ["--model.n_kv_heads", "2"]),
          (4, True, ["--model.n_kv_heads", "4", *_MOD]), (2, True, ["--model.n_kv_heads", "2", *_MOD]),
          (2, False, ["--model.n_kv_heads", "2", *_MOD])]


def _key(tp: int, sp: bool, extra: list[str]) -> tuple:
    return tp, sp, "mod" if "--mod.enabled" in extra else "dense"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _gather(t: torch.Tensor, dim: int | None, group) -> torch.Tensor:
    if dim is None:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _compare_with_single_device(rank: int, world_size: int) -> dict:
    from megamod.config import load_config
    from megamod.model.gpt import build_model
    from megamod.parallel.dims import ParallelDims
    from megamod.parallel.loss import build_loss_fn, lm_loss
    from megamod.parallel.parallelize import parallelize_model
    from megamod.parallel.tensor import shard_dims

    out = {}
    for tp, sp, extra in _CASES:
        cfg = load_config(None, [*_BASE, *extra, "--parallel.tp", str(tp),
                                 "--parallel.sequence_parallel", str(sp).lower()])
        dims = ParallelDims(tp=tp, cp=1, dp=world_size // tp, pp=1, rank=rank)
        dims.build_groups()
        group = dims.group("tp")
        ref = build_model(cfg)
        model = build_model(cfg, parallelize=lambda m: parallelize_model(m, cfg, dims))
        dims_of = shard_dims(ref)
        gen = torch.Generator().manual_seed(0)
        batch = torch.randint(0, cfg.model.vocab_size, (2, cfg.train.seq_len + 1), generator=gen)
        tokens, targets = batch[:, :-1], batch[:, 1:]

        ref_logits = ref(tokens)
        ref_loss = lm_loss(ref_logits, targets)
        ref_loss.backward()
        logits = model(tokens)  # (B, S, V/tp)
        loss = build_loss_fn(cfg, dims)(logits, targets)
        loss.backward()

        ref_grads = dict(ref.named_parameters())
        case = {"logits_shape": tuple(logits.shape), "ref_params": sorted(ref_grads),
                "logits": _rel(_gather(logits.detach(), -1, group), ref_logits.detach()),
                "loss": abs(loss.item() - ref_loss.item()) / ref_loss.item(),
                "grads": {name: _rel(_gather(p.grad, dims_of[name], group), ref_grads[name].grad)
                          for name, p in model.named_parameters()}}
        out[_key(tp, sp, extra)] = case
    out["rng"] = _tp_rng(rank, world_size)
    return out


def _tp_rng(rank: int, world_size: int) -> dict:
    """Draws inside ``TPRNGTracker.fork`` differ across TP ranks and advance between calls;
    the default stream is shared by all ranks and untouched by the fork."""
    from megamod.parallel.dims import ParallelDims
    from megamod.parallel.tp_layers import TPRNGTracker

    dims = ParallelDims(tp=2, cp=1, dp=world_size // 2, pp=1, rank=rank)
    torch.manual_seed(1234)
    tracker = TPRNGTracker(1234, dims.coords()["tp"])
    with tracker.fork():
        a = torch.rand(4)
    with tracker.fork():
        b = torch.rand(4)
    default_after = torch.rand(4)
    torch.manual_seed(1234)
    default_plain = torch.rand(4)
    return {"tp_rank": dims.coords()["tp"], "a": a, "b": b, "default": default_after,
            "default_untouched": torch.equal(default_after, default_plain)}


@pytest.fixture(scope="module")
def results():
    """One 4-rank run for the whole module (starting ranks is the expensive part on CPU)."""
    return run_distributed(_compare_with_single_device, 4)


def test_tp_and_sp_match_single_device(results):
    for tp, sp, extra in _CASES:
        for rank, res in enumerate(results):
            case = res[_key(tp, sp, extra)]
            where = f"{_key(tp, sp, extra)} rank={rank}"
            assert case["logits_shape"] == (2, 16, 256 // tp), where  # vocab-sharded, never gathered
            assert case["logits"] < 1e-5, (where, case["logits"])
            assert case["loss"] < 1e-5, (where, case["loss"])
            assert sorted(case["grads"]) == case["ref_params"], where  # every parameter compared
            bad = {n: e for n, e in case["grads"].items() if not e < 1e-5}
            assert not bad, (where, bad)


def test_tp_rng_streams(results):
    results = [r["rng"] for r in results]
    by_tp = {}
    for res in results:
        assert res["default_untouched"]
        assert not torch.equal(res["a"], res["b"])  # the stream advances
        by_tp.setdefault(res["tp_rank"], []).append(res)
    assert not torch.equal(by_tp[0][0]["a"], by_tp[1][0]["a"])  # differs across TP ranks
    assert torch.equal(by_tp[0][0]["a"], by_tp[0][1]["a"])  # same TP rank, other DP replica: same
    assert all(torch.equal(r["default"], results[0]["default"]) for r in results)  # default stream agrees
