"""Data: tokenizer, Megatron .bin/.idx datasets, training samples, the demo corpus.

Submodules are imported by name (``megamod.data.indexed``, ``megamod.data.gpt_dataset``, ...);
nothing is imported here, so the tools that only tokenize never load torch.
"""
