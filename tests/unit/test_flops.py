"""Analytic FLOPs (megamod.model.flops) against torch's FlopCounterMode, dense and MoD."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megamod.config import load_config
from megamod.model.gpt import build_model
from megamod.model.flops import forward_flops_per_sequence, layer_forward_flops, train_flops_per_step


def _cfg(*argv):
    return load_config(None, ["--data.synthetic", "true", "--train.seq_len", "256", *argv])


def test_routed_layer_flops_by_hand():
    """debug flavour (d 128, ffn 384), S 256, capacity 0.125 -> k 32, predictor hidden d/8 = 16:
    linears 2·k·(4d² + 3·d·ffn) = 2·32·212,992 = 13,631,488; attention 4·k²·d = 524,288;
    router 2·d·S = 65,536; predictor 2·S·(d·16 + 16) = 1,056,768. Total 15,278,080.
    A dense layer: 2·256·212,992 + 4·256²·128 = 142,606,336."""
    cfg = _cfg("--mod.enabled", "true")
    assert layer_forward_flops(cfg, 1, 256) == 15_278_080
    assert layer_forward_flops(cfg, 0, 256) == 142_606_336
    no_predictor = _cfg("--mod.enabled", "true", "--mod.predictor", "false")
    assert layer_forward_flops(no_predictor, 1, 256) == 15_278_080 - 1_056_768
    random = _cfg("--mod.enabled", "true", "--mod.routing", "random")  # no router, no predictor
    assert layer_forward_flops(random, 1, 256) == 15_278_080 - 1_056_768 - 65_536


@pytest.mark.parametrize("argv", [
    [],
    ["--mod.enabled", "true"],                                            # learned, predictor, blocks 1 and 3
    ["--mod.enabled", "true", "--mod.every", "1", "--mod.capacity", "0.3", "--model.n_kv_heads", "2"],
    ["--mod.enabled", "true", "--mod.routing", "random"],
], ids=["dense", "mod", "mod-every1-gqa", "mod-random"])
def test_flops_agree_with_flop_counter(argv):
    cfg = _cfg(*argv)
    model = build_model(cfg)
    tokens = torch.randint(0, 4096, (1, 256))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fwd:  # math SDPA: counted bmm's
        model(tokens)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as step:
        model(tokens).float().pow(2).mean().backward()
    expected = forward_flops_per_sequence(cfg)
    assert fwd.get_total_flops() == pytest.approx(expected, rel=0.02)
    # backward = 2× forward, except the predictor's first layer, whose input is detached (no dX)
    assert step.get_total_flops() == pytest.approx(train_flops_per_step(cfg, 1), rel=0.02)


def test_mod_forward_is_cheaper():
    """Blocks 1, 3 at 12.5%, S 256: blocks 4·142.6M -> 2·142.6M + 2·15.3M; plus the output layer
    2·S·d·V = 268.4M in both: 584,204,288 / 838,860,800 = 0.6964."""
    dense, mod = forward_flops_per_sequence(_cfg()), forward_flops_per_sequence(_cfg("--mod.enabled", "true"))
    assert mod / dense == pytest.approx(584_204_288 / 838_860_800)


def test_moba_layer_flops_by_hand():
    """debug flavour, S 256, MoBA blocks of 64, top-3: each query attends to 3·64 = 192 keys,
    4·S·192·d = 25,165,824, and the gate scores 4 blocks, 2·S·4·d = 262,144; the linears as a
    dense layer, 2·256·212,992 = 109,051,904. Total 134,479,872 (dense: 142,606,336).
    full_attention_layers [-1] keeps block 3 dense; at S <= topk·B every key is attended."""
    cfg = _cfg("--model.attention", "moba", "--moba.chunk_size", "64", "--moba.topk", "3",
               "--moba.full_attention_layers", "-1")
    assert layer_forward_flops(cfg, 0, 256) == 134_479_872
    assert layer_forward_flops(cfg, 3, 256) == 142_606_336
    assert layer_forward_flops(cfg, 0, 128) == 2 * 128 * 212_992 + 4 * 128 * 128 * 128 + 2 * 128 * 2 * 128
    routed = _cfg("--model.attention", "moba", "--moba.chunk_size", "64", "--moba.topk", "3", "--mod.enabled", "true",
                  "--mod.routing", "random", "--mod.capacity", "0.5")  # k = 128 tokens through MoBA
    assert layer_forward_flops(routed, 1, 256) == layer_forward_flops(cfg, 0, 128)
