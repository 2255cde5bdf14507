"""megamod: a Megatron-style trainer for GPT models with Mixture-of-Depths and MoBA attention.

    import megamod
    model, cfg = megamod.load_model("runs/demo")     # any complete checkpoint, as the single-device model
    tok = megamod.load_tokenizer("runs/demo")

Importing megamod imports nothing (not even torch): the two functions come from
megamod/infer/load.py on first use.
"""

__all__ = ["load_model", "load_tokenizer"]


def __getattr__(name: str):
    if name in __all__:
        from megamod.infer import load

        return getattr(load, name)
    raise AttributeError(f"module 'megamod' has no attribute {name!r}")
