"""The single-device GPT: Llama-style decoder (RMSNorm, RoPE, SwiGLU, MHA/GQA).

Parallelism is applied from outside (parallel/tensor.py, parallel/pipeline.py): this file
never branches on it. For pipeline splitting the layers live in an ``nn.ModuleDict`` keyed by
layer id and the embedding/norm/output may be ``None`` on a stage, so module names stay the
same at every PP degree and checkpoints stay portable.

Notation: B batch, S sequence, d model width, V vocabulary (V/tp where TP shards it).
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from megamod.compat import build_rms_norm
from megamod.config import Config, ModelConfig
from megamod.model.attention import MobaAttention, SDPAttention
from megamod.model.block import Block
from megamod.model.mod import RoutedBlock, routed_layers
from megamod.model.rope import rope_tables

if TYPE_CHECKING:
    from megamod.model.kv_cache import KVCache


def moba_layers(cfg: Config) -> set[int]:
    """Indices of the blocks with MoBA attention (hybrid MoBA keeps some layers dense)."""
    if cfg.model.attention != "moba":
        return set()
    n = cfg.model.n_layers
    return set(range(n)) - {i % n for i in cfg.moba.full_attention_layers}


def build_inner_attention(cfg: Config, layer_id: int) -> nn.Module:
    """The one place the attention kind is chosen."""
    if layer_id in moba_layers(cfg):
        return MobaAttention(cfg.moba.chunk_size, cfg.moba.topk)
    return SDPAttention()


def build_block(cfg: Config, layer_id: int) -> Block:
    """The one place a layer's kind is chosen: a dense block, or a Mixture-of-Depths routed one
    (same parameter names plus ``router``/``predictor``, so TP plans and checkpoints carry over)."""
    if layer_id in routed_layers(cfg):
        return RoutedBlock(cfg.model, build_inner_attention(cfg, layer_id), cfg.mod)
    return Block(cfg.model, build_inner_attention(cfg, layer_id))


class GPT(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        m = cfg.model
        self.model_cfg = m
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(m.vocab_size, m.d_model)
        self.layers = nn.ModuleDict({str(i): build_block(cfg, i) for i in range(m.n_layers)})
        self.norm: nn.Module | None = build_rms_norm(m.d_model, m.norm_eps)
        self.output: nn.Linear | None = nn.Linear(m.d_model, m.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share input embedding and output weights (re-done after ``to_empty``, which unties)."""
        if self.model_cfg.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, valid: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, S) ids — or (B, S, d) hidden states on a later pipeline stage.

        positions (S,) or (B, S): the original positions of the tokens this rank holds (context
        parallelism holds them out of order); default arange(S).
        cache: incremental decoding (megamod/infer): the S new tokens at ``positions`` attend to
        the cached keys/values of earlier tokens, and each layer appends its own. ``valid`` (B, S):
        with a cache, which tokens are real (a prefix per row: ragged prompts right-padded).
        logits_at (B,): return only the logits of token ``logits_at[b]`` of each row, (B, 1, V)
        (decoding needs one position; a 128K-token prefill would otherwise build 128K x V logits).
        Returns logits (B, S, V) — or hidden states (B, S, d) on a stage without the output layer.
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if positions is None:
            positions = torch.arange(h.shape[1], device=h.device)
        cos, sin = rope_tables(positions, self.model_cfg.head_dim, self.model_cfg.rope_theta)
        for i, layer in self.layers.items():
            h = layer(h, cos, sin) if cache is None else layer(h, cos, sin, cache.layer(int(i), positions, valid))
        if logits_at is not None:
            h = h.gather(1, logits_at.view(-1, 1, 1).expand(-1, 1, h.shape[-1]))  # (B, 1, d)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Deterministic init that does not depend on device, TP degree or construction order.

        Each parameter draws from its own CPU generator seeded by (seed, name), full-size; a
        parameter sharded by TP carries ``tp_shard = (dim, rank, world)`` and keeps its slice,
        so a tp=2 model starts as exactly the tp=1 weights, sharded. Residual output projections
        (wo, w2) are scaled by 1/sqrt(2·n_layers) (GPT-2).
        """
        m = self.model_cfg
        for name, p in self.named_parameters():
            if p.ndim == 1:
                p.fill_(0.0 if name.endswith("bias") else 1.0)  # norm gains
                continue
            std = m.init_std
            if name.endswith(("wo.weight", "w2.weight")):
                std = m.init_std / (2 * m.n_layers) ** 0.5
            _normal_full_then_shard(p, std, seed, name)


def _normal_full_then_shard(p: torch.Tensor, std: float, seed: int, name: str) -> None:
    dim, rank, world = getattr(p, "tp_shard", (0, 0, 1))
    full_shape = list(p.shape)
    full_shape[dim] *= world
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    full = torch.randn(full_shape, generator=gen) * std
    p.copy_(full.narrow(dim, rank * p.shape[dim], p.shape[dim]))


def build_model(cfg: Config, device: torch.device | str = "cpu", seed: int | None = None,
                parallelize: Callable[[GPT], None] | None = None) -> GPT:
    """Construct on the meta device (no memory), let ``parallelize`` swap/shard modules there,
    then allocate on ``device`` uninitialised and run ``init_weights``."""
    with torch.device("meta"):
        model = GPT(cfg)
    if parallelize is not None:
        parallelize(model)
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(cfg.train.seed if seed is None else seed)
    return model


def count_parameters(model_cfg: ModelConfig) -> dict[str, int]:
    """Exact counts from a meta-device build (no memory). 'non_embedding' excludes only the
    input embedding table (the PaLM MFU convention); a tied output is then counted once."""
    cfg = Config(model=model_cfg)
    with torch.device("meta"):
        model = GPT(cfg)
    total = sum(p.numel() for p in model.parameters())
    emb = model.tok_embeddings.weight.numel()
    non_emb = total - emb if not model_cfg.tie_embeddings else total
    return {"total": total, "non_embedding": non_emb}
