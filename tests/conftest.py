"""Settings every test process (and every subprocess it starts) shares.

DeepSpeed JIT-builds a C++ shared-memory comm op on CPU and caches it under
TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions, shared with every other Python
environment on the machine, which may build it with other flags and so force a rebuild of
30-60 s). Keeping the cache inside the venv builds it once per checkout.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def load_tool():
    """``load_tool("preprocess_data").main([...])``: a script of tools/ as a module (tools/ is not
    a package), so tests run its command line in-process."""
    tools = Path(__file__).resolve().parents[1] / "tools"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, tools / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture(scope="session")
def reference_adamw_step():
    """``norm = reference_adamw_step(params, opt, max_norm)``: what an optimizer that clips inside
    its own step is held to: the gradients' global norm, torch's ``clip_grad_norm_`` (max_norm 0:
    no clipping), then ``opt.step()`` of a plain AdamW. Returns the norm before clipping."""
    import torch

    def step(params, opt, max_norm: float):
        norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        return norm

    return step
