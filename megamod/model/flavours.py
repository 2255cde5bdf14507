"""Exact parameter counts of the named flavours (``megamod.config.FLAVOURS``):

    python -m megamod.model.flavours

Pinned in tests/unit/test_model.py and listed in the README.
"""

from __future__ import annotations

from megamod.config import FLAVOURS, ModelConfig
from megamod.model.gpt import count_parameters


def _main() -> None:
    for name in FLAVOURS:
        cfg = ModelConfig.from_flavour(name)
        n = count_parameters(cfg)
        print(f"{name:>6}: {n['total']:>14,d} parameters ({n['non_embedding']:,d} without the input embedding)")


if __name__ == "__main__":
    _main()
