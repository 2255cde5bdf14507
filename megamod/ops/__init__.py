"""Kernels behind small seams. Importing this package never imports triton: the Triton MoBA
kernels load lazily, on the first CUDA call."""
from megamod.ops.moba import moba_attn_varlen

__all__ = ["moba_attn_varlen"]
