"""FP8 training on CPU gloo ranks (torch's CPU ``_scaled_mm`` runs torchao's float8 linears; the
trainer itself requires a GPU of compute capability 8.9+, so ``check_fp8_support`` is bypassed in
these processes):

- tensor parallelism: tp 2 with sequence parallelism and a MoD block, FP8 on the column/row-
  parallel linears, against the fp32 single-device model. Each rank scales its own shards, so
  tp 2 FP8 is not tp 1 FP8 bit for bit; both sit within FP8's precision of fp32. Tolerances as in
  tests/unit/test_fp8.py (e4m3/e5m2 rounding, ~5-10% rms per element: gradient cosine ≥ 0.98,
  logits within 0.1 of their largest magnitude, the loss within 1e-3);
- the trainer with DeepSpeed ZeRO 0 (the autocast recipe at 2 ranks), 1 and 2 (bf16 master
  weights), dp 2: FP8 steps follow the bf16 run's losses (uniform synthetic tokens keep the loss
  near ln 256 = 5.55, so 1e-2 relative is ~5 FP8-sized nudges), and the checkpoint's module
  state has the same keys as the bf16 one's (FP8 saves nothing of its own).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from _harness import run_distributed

_BASE = ["--data.synthetic", "true", "--model.n_layers", "2", "--model.d_model", "64", "--model.n_heads", "4",
         "--model.n_kv_heads", "2", "--model.ffn_hidden", "128", "--model.vocab_size", "256", "--train.seq_len", "32"]
_MOD = ["--mod.enabled", "true", "--mod.capacity", "0.5"]
_TRAIN = ["--train.micro_batch_size", "4", "--train.steps", "3", "--train.dtype", "bf16", "--train.device", "auto",
          "--train.log_interval", "1", "--train.eval_interval", "0", "--logging.tensorboard", "false",
          "--checkpoint.resume", "false", "--train.progress", "off", "--optim.lr", "1e-3"]


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


def _gather(t: torch.Tensor, dim: int | None) -> torch.Tensor:
    """The full tensor from the two TP ranks' shards along ``dim`` (None: replicated)."""
    if dim is None:
        return t
    parts = [torch.empty_like(t) for _ in range(2)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=dim)


def _tp_against_single_device(rank: int) -> dict:
    from megamod.config import load_config
    from megamod.model.gpt import build_model
    from megamod.parallel.dims import ParallelDims
    from megamod.parallel.fp8 import apply_fp8, is_fp8_linear
    from megamod.parallel.loss import build_loss_fn, lm_loss
    from megamod.parallel.parallelize import parallelize_model
    from megamod.parallel.tensor import shard_dims

    cfg = load_config(None, [*_BASE, *_MOD, "--parallel.tp", "2", "--parallel.sequence_parallel", "true"])
    dims = ParallelDims(tp=2, cp=1, dp=1, pp=1, rank=rank)
    dims.build_groups()
    batch = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    tokens, targets = batch[:, :-1], batch[:, 1:]
    ref = build_model(cfg)
    ref_loss = lm_loss(ref(tokens), targets)
    ref_loss.backward()
    model = build_model(cfg, parallelize=lambda m: parallelize_model(m, cfg, dims))
    swapped = apply_fp8(model, "tensorwise")
    logits = model(tokens)  # (B, S, V/tp)
    loss = build_loss_fn(cfg, dims)(logits, targets)
    loss.backward()
    ref_logits = ref(tokens).detach()
    dims_of = shard_dims(ref)
    grads = {name: _cos(_gather(p.grad, dims_of[name]), ref.get_parameter(name).grad)
             for name, p in model.named_parameters()}
    fp8_types = {type(model.get_submodule(n)).__name__ for n in swapped}
    return {"swapped": len(swapped), "types": fp8_types, "loss": abs(loss.item() - ref_loss.item()) / ref_loss.item(),
            "logits": ((_gather(logits.detach(), -1) - ref_logits).abs().max() / ref_logits.abs().max()).item(),
            "block_grads": {n: c for n, c in grads.items() if is_fp8_linear(n.rpartition(".")[0])},
            "other_grads": {n: c for n, c in grads.items() if not is_fp8_linear(n.rpartition(".")[0])}}


def _trainer_runs(rank: int, tmp: str) -> dict:
    import megamod.train.trainer as trainer_module
    from megamod.config import load_config
    from _trainers import build_trainer, train_steps

    trainer_module.check_fp8_support = lambda device: None  # CPU: see the module docstring
    out = {}
    for zero in (0, 1, 2):
        for fp8 in ("off", "tensorwise"):
            run_dir = f"{tmp}/z{zero}_{fp8}"
            cfg = load_config(None, [*_BASE, *_MOD, *_TRAIN, "--optim.zero_stage", str(zero), "--train.fp8", fp8,
                                     "--train.run_dir", run_dir])
            trainer = build_trainer(rank, 2, cfg)
            n_fp8 = sum("Float8" in type(m).__name__ for m in trainer.model.modules())
            losses = [loss for loss, _ in train_steps(trainer, 3)]
            keys = sorted(trainer.engine.module.state_dict())
            out[zero, fp8] = {"losses": losses, "fp8_modules": n_fp8, "keys": keys}
            trainer.metrics.close()
    return out


def _body(rank: int, world_size: int, tmp: str) -> dict:
    return {"tp": _tp_against_single_device(rank), "train": _trainer_runs(rank, tmp)}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(_body, 2, str(tmp_path_factory.mktemp("fp8")))


def test_fp8_under_tp_follows_fp32(results):
    for rank, res in enumerate(results):
        tp = res["tp"]
        assert tp["swapped"] == 14 and tp["types"] == {"Float8ColumnParallelLinear", "Float8RowParallelLinear"}
        assert tp["loss"] < 1e-3 and tp["logits"] < 0.1, (rank, tp["loss"], tp["logits"])
        assert min(tp["block_grads"].values()) > 0.98, (rank, tp["block_grads"])
        assert min(tp["other_grads"].values()) > 0.95, (rank, tp["other_grads"])  # embedding, norms, router


def test_fp8_trains_under_zero_0_1_2_and_keeps_the_checkpoint_keys(results):
    for rank, res in enumerate(results):
        runs = res["train"]
        for zero in (0, 1, 2):
            off, fp8 = runs[zero, "off"], runs[zero, "tensorwise"]
            assert off["fp8_modules"] == 0 and fp8["fp8_modules"] == 14, zero
            assert fp8["keys"] == off["keys"], zero
            for a, b in zip(fp8["losses"], off["losses"]):
                assert a == pytest.approx(b, rel=1e-2), (zero, fp8["losses"], off["losses"])
            assert fp8["losses"] != off["losses"], zero  # the FP8 path ran
