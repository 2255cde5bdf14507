"""Run a function on N CPU processes joined by a gloo process group, and collect what each returns.

    from _harness import run_distributed

    def _body(rank, world_size, scale):          # top level, so ``spawn`` can import it
        t = torch.full((2,), float(rank))
        dist.all_reduce(t)
        return t * scale

    def test_sum():
        out = run_distributed(_body, 4, 2.0)      # one entry per rank, in rank order
        assert all(torch.equal(o, torch.full((2,), 12.0)) for o in out)

- Rendezvous goes through a file in a fresh temporary directory (``file://``), so there are no
  ports to pick, reserve or collide on, and concurrent test sessions cannot meet each other.
- Processes are started with ``spawn``: each is a fresh interpreter, so no state (RNG, DeepSpeed
  globals, process groups) leaks from the test process or between calls.
- Each rank gets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in its environment (DeepSpeed reads
  them), one intra-op thread (the test machine has few cores and several ranks share them) and
  ``DS_ACCELERATOR=cpu``.
- DeepSpeed JIT-builds a C++ shared-memory comm op on CPU at ``initialize`` and caches it under
  ``TORCH_EXTENSIONS_DIR`` (default ~/.cache/torch_extensions, shared by every Python
  environment on the machine). Two environments with different compile flags rebuild each
  other's copy, 30-60 s each on a loaded 2-core box, so unless the caller set it the cache lives
  inside this interpreter's prefix (the venv): built once, then loaded in well under a second.
- Return values travel through ``torch.save`` files: tensors, dicts, lists, numbers.
- A rank that raises fails the call with that rank's traceback; a call that runs past
  ``timeout`` seconds is killed and raises ``TimeoutError`` (a hang, e.g. mismatched collectives,
  must not hang the test session).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

__all__ = ["run_distributed"]


def _worker(rank: int, fn: Callable[..., Any], world_size: int, tmp: str, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                      DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=rank,
                            world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        dist.barrier()  # nobody tears the group down while another rank still talks to it
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(tmp, f"result_{rank}.pt"))


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks -> ``[result of rank 0, ...]``.

    ``fn`` must be a module-level function (``spawn`` pickles it by name); ``args`` must pickle.
    """
    with tempfile.TemporaryDirectory(prefix="megamod_dist_") as tmp:
        ctx = mp.start_processes(_worker, args=(fn, world_size, tmp, args), nprocs=world_size, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(0.0, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"{getattr(fn, '__name__', fn)} on {world_size} ranks ran past {timeout:.0f}s")
        return [torch.load(os.path.join(tmp, f"result_{r}.pt"), weights_only=False) for r in range(world_size)]
