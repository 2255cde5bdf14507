"""Settings every test process (and every subprocess it starts) shares.

DeepSpeed JIT-builds a C++ shared-memory comm op on CPU and caches it under
TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions, shared with every other Python
environment on the machine, which may build it with other flags and so force a rebuild of
30-60 s). Keeping the cache inside the venv builds it once per checkout.
"""

import os
import sys

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
