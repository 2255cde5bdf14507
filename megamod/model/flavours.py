"""Named model flavours (torchtitan's ``llama3_configs`` idea).

Each entry lists only what differs from ``ModelConfig``'s defaults. Exact parameter counts are
printed by ``python -m megamod.model.flavours`` and pinned in tests/unit/test_model.py.
"""

from __future__ import annotations

FLAVOURS: dict[str, dict[str, object]] = {
    # Tiny: trains in minutes on a 2-core CPU (the demo and most tests).
    "debug": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, ffn_hidden=384, vocab_size=4096),
    # GPT-3 table shapes, Llama-style blocks (SwiGLU hidden ≈ 8/3·d rounded to 256).
    "125m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_hidden=2048, vocab_size=32000),
    "350m": dict(d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, ffn_hidden=2816, vocab_size=32000),
    "760m": dict(d_model=1536, n_layers=24, n_heads=16, n_kv_heads=16, ffn_hidden=4096, vocab_size=32000),
    # TinyLlama-1.1B-like shape with full MHA: ~1.26B parameters untied (the throughput issue's model).
    "1b": dict(d_model=2048, n_layers=22, n_heads=16, n_kv_heads=16, ffn_hidden=5632, vocab_size=32000),
    # ~2.07B untied: 24 layers of d=2560, head dim 128.
    "2b": dict(d_model=2560, n_layers=24, n_heads=20, n_kv_heads=20, ffn_hidden=6912, vocab_size=32000),
}


def _main() -> None:
    from megamod.config import ModelConfig
    from megamod.model.gpt import count_parameters

    for name in FLAVOURS:
        cfg = ModelConfig.from_flavour(name)
        n = count_parameters(cfg)
        print(f"{name:>6}: {n['total']:>14,d} parameters ({n['non_embedding']:,d} without the input embedding)")


if __name__ == "__main__":
    _main()
