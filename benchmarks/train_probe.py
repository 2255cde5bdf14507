"""The trainer CLI with two measuring switches that belong to benchmarks, not to the library
(multi_gpu.py launches it in place of ``-m megamod.train``, under torchrun or alone):

    python benchmarks/train_probe.py [--skip-cp-comm] [--profile-steps A:B --profile-out DIR] -- TRAINER FLAGS

--skip-cp-comm  context parallelism's collectives (megamod/parallel/cp_comm.py's all-gather and
    reduce-scatter: K/V, dK/dV, MoBA's block means, MoD's router logits) become local copies of the
    same shapes: an all-gather writes this rank's piece into every slot of its output, a
    reduce-scatter keeps this rank's slot of its input. Every kernel of the step runs on tensors of
    the real shapes, and the output buffers are written as the collective writes them, so the
    step time differs from the real one by the transfers and by the waiting for the slowest rank
    inside them: the CP communication that compute does not hide. The numbers it trains on are
    wrong (a rank sees its own keys in place of its peers'), so only its timing is used. MoBA's
    picks then come from other block means, but every query still takes topk blocks, so its work
    is the same. Data parallelism's gradient reduction and the loss's all-reduce stay real.
--profile-steps A:B  torch.profiler (CPU and CUDA) over optimizer steps A..B; each rank writes
    DIR/rank{R}.json: per step the NCCL kernels' time (``nccl_ms``), the part of it when no other
    kernel ran on the GPU (``exposed_ms``: comm intervals minus compute intervals), per collective
    kind, kernel counts, and the profiled wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def local_all_gather(out, inp, group=None, async_op=False):
    """Stand-in for all_gather_into_tensor: out (n·len(inp), ...) gets inp in each of its n slots."""
    n = out.numel() // inp.numel()
    out.view(n, *inp.shape).copy_(inp.unsqueeze(0).expand(n, *inp.shape))


def local_reduce_scatter(out, inp, group=None, async_op=False, **_):
    """Stand-in for reduce_scatter_tensor: out gets this rank's slot of inp, nothing summed."""
    import torch.distributed as dist

    n = inp.numel() // out.numel()
    out.copy_(inp.view(n, *out.shape)[dist.get_rank(group)])


def skip_cp_comm() -> None:
    from megamod.parallel import cp_comm

    cp_comm.all_gather_single = local_all_gather
    cp_comm.reduce_scatter_single = local_reduce_scatter


# ---- trace arithmetic ----------------------------------------------------------------------------
def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def uncovered(comm: list[tuple[float, float]], compute: list[tuple[float, float]]) -> float:
    """Time inside the union of ``comm`` that no ``compute`` interval covers."""
    comm, compute = union(comm), union(compute)
    exposed, j = 0.0, 0
    for a, b in comm:
        t = a
        while j < len(compute) and compute[j][1] <= t:
            j += 1
        k = j
        while t < b and k < len(compute) and compute[k][0] < b:
            exposed += max(0.0, compute[k][0] - t)
            t = max(t, compute[k][1])
            k += 1
        exposed += max(0.0, b - t)
    return exposed


def collective_kind(name: str) -> str:
    m = re.search(r"(AllReduce|AllGather|ReduceScatter|Broadcast|Reduce|SendRecv|Send|Recv|AllToAll)", name)
    return m.group(1) if m else "other"


def summarise(events: list[dict], steps: int) -> dict:
    """Per-step NCCL kernel time, its exposed part and per-kind split from chrome-trace events (µs)."""
    kernels = [e for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"]
    comm = [e for e in kernels if "nccl" in e["name"].lower()]
    compute = [e for e in kernels if "nccl" not in e["name"].lower()]
    span = lambda es: [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in es]  # noqa: E731
    by_kind: dict[str, float] = {}
    for e in comm:
        by_kind[collective_kind(e["name"])] = by_kind.get(collective_kind(e["name"]), 0.0) + float(e["dur"])
    per = lambda us: us / 1e3 / max(1, steps)  # noqa: E731  µs in total -> ms per step
    return {"steps": steps, "nccl_ms": per(length(union(span(comm)))),
            "nccl_kernel_ms": per(sum(float(e["dur"]) for e in comm)),
            "exposed_ms": per(uncovered(span(comm), span(compute))),
            "compute_ms": per(length(union(span(compute)))),
            "nccl_kernels": len(comm) / max(1, steps), "by_kind_ms": {k: per(v) for k, v in sorted(by_kind.items())}}


def install_profiler(first: int, last: int, out_dir: Path) -> None:
    import torch
    import torch.distributed as dist

    from megamod.train.trainer import Trainer

    inner = Trainer.train_step

    def train_step(self, batches):
        step = self.state.step + 1
        if step == first:
            acts = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._probe = (torch.profiler.profile(activities=acts), time.perf_counter())
            self._probe[0].__enter__()
        loss = inner(self, batches)
        if step == last and getattr(self, "_probe", None):
            prof, t0 = self._probe
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            wall = time.perf_counter() - t0
            prof.__exit__(None, None, None)
            rank = dist.get_rank()
            out_dir.mkdir(parents=True, exist_ok=True)
            trace = out_dir / f"trace_rank{rank}.json"
            prof.export_chrome_trace(str(trace))
            summary = summarise(json.loads(trace.read_text())["traceEvents"], last - first + 1)
            summary["wall_ms"] = wall * 1e3 / (last - first + 1)
            (out_dir / f"rank{rank}.json").write_text(json.dumps(summary, indent=1))
            trace.unlink()  # 10-100 MB a rank; the summary is what the driver reads
            self._probe = None
        return loss

    Trainer.train_step = train_step


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else ([], argv)
    ap = argparse.ArgumentParser(prog="train_probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-cp-comm", action="store_true")
    ap.add_argument("--profile-steps", default="", help="A:B, optimizer steps to profile (1-based, inclusive)")
    ap.add_argument("--profile-out", default="", help="folder for the per-rank summaries")
    a = ap.parse_args(own)
    if a.skip_cp_comm:
        skip_cp_comm()
    if a.profile_steps:
        first, last = map(int, a.profile_steps.split(":"))
        install_profiler(first, last, Path(a.profile_out or os.getcwd()))
    from megamod.train.cli import main as train_main

    return train_main(rest)


if __name__ == "__main__":
    sys.exit(main())
