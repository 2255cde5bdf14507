"""Analytic FLOPs of a training step, for TFLOP/s and MFU.

Conventions (PaLM appendix B, and what torch.utils.flop_counter counts):
- a (m×k)·(k×n) matmul is 2mkn FLOPs; elementwise work, norms and softmax are not counted;
- attention scores and the weighted sum are counted for the full S×S square (not halved for
  causality), 4·S²·d per layer and sequence in the forward pass;
- backward is twice the forward, so a training step is 3× forward (6N + 12·L·d·S per token);
- the input embedding is a lookup (0 FLOPs); the output projection is a matmul.
Mixture-of-Depths: a routed block at capacity c runs its linears on c·S tokens and its
attention on a (c·S)² square, plus the router (2d per token) and predictor (learned routing).
MoBA (layers not kept dense by moba.full_attention_layers): each query attends to topk blocks of
B keys (all S when S <= topk·B), counted as full blocks like the dense square, so 4·S·min(S,
topk·B)·d; the gate scores every block, q·mean(K_block), 2·S·ceil(S/B)·d (the block means are
elementwise). Inside a routed block both apply to its k selected tokens.
"""

from __future__ import annotations

from megamod.config import Config, ModelConfig
from megamod.model.gpt import moba_layers
from megamod.model.mod import predictor_hidden, routed_layers, routed_tokens


def block_linear_params(m: ModelConfig) -> int:
    kv = m.n_kv_heads * m.head_dim
    return m.d_model * (m.d_model + 2 * kv) + m.d_model * m.d_model + 3 * m.d_model * m.ffn_hidden


def mod_capacity_tokens(capacity: float, seq_len: int, window: int = 0) -> int:
    """k tokens a routed block processes per sequence: max(1, floor(capacity · W)) per window of W
    tokens (0: the whole sequence; DESIGN.md, MoD)."""
    return routed_tokens(capacity, window, seq_len)


def layer_forward_flops(cfg: Config, layer_id: int, seq_len: int) -> int:
    """Forward FLOPs of one block for one sequence of seq_len tokens. A routed block: linears on
    its k tokens, attention on a k² square, and (learned routing) the router and predictor on all
    S tokens; the gather/scatter, sort and gate are elementwise (not counted)."""
    m = cfg.model
    tokens = seq_len
    extra = 0
    if layer_id in routed_layers(cfg):
        tokens = mod_capacity_tokens(cfg.mod.capacity, seq_len, cfg.mod.window)
        if cfg.mod.routing == "learned":
            extra = 2 * m.d_model * seq_len  # router r = wᵀx on every token
            if cfg.mod.predictor:
                hidden = predictor_hidden(cfg.mod, m.d_model)
                extra += 2 * seq_len * (m.d_model * hidden + hidden)  # d -> hidden -> 1
    return 2 * tokens * block_linear_params(m) + attention_forward_flops(cfg, layer_id, tokens) + extra


def attention_forward_flops(cfg: Config, layer_id: int, tokens: int) -> int:
    """Scores and weighted sum (and MoBA's gate) of one layer over a sequence of ``tokens``."""
    d = cfg.model.d_model
    if layer_id not in moba_layers(cfg):
        return 4 * tokens * tokens * d
    b, topk = cfg.moba.chunk_size, cfg.moba.topk
    return 4 * tokens * min(tokens, topk * b) * d + 2 * tokens * -(-tokens // b) * d


def forward_flops_per_sequence(cfg: Config, seq_len: int | None = None) -> int:
    s = cfg.train.seq_len if seq_len is None else seq_len
    layers = sum(layer_forward_flops(cfg, i, s) for i in range(cfg.model.n_layers))
    return layers + 2 * s * cfg.model.d_model * cfg.model.vocab_size


def train_flops_per_step(cfg: Config, sequences: int) -> int:
    """FLOPs of forward + backward over ``sequences`` samples (the whole global batch, or a rank's)."""
    return 3 * forward_flops_per_sequence(cfg) * sequences


def peak_flops(device_name: str, dtype: str) -> float | None:
    """Dense peak FLOP/s for MFU: dtype "bf16", "fp32" (tf32) or "fp8"; None where unknown (CPU,
    FP8 on a GPU without it). H100/H200 SXM: 989 TFLOP/s bf16, 1979 FP8 (twice bf16), 495 tf32."""
    name = device_name.upper()
    table = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
    has_fp8 = ("H200", "H100")
    for key, bf16 in table.items():
        if key in name:
            if dtype == "fp8":
                return 2 * bf16 if key in has_fp8 else None
            return bf16 if dtype == "bf16" else bf16 / 2  # tf32 is half the bf16 rate
    return None
