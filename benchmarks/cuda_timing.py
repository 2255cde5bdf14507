"""CUDA-event timers shared by the GPU benchmark scripts (moba_speed, gemm_shapes, optimizer_overlap)."""

from __future__ import annotations

import statistics

import torch


def timed(fn, reps, warmup=1):
    """(median ms, every ms) of ``reps`` calls of ``fn``, the device synchronised around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out), out


def timed_queued(fn, reps):
    """Mean time per call of reps calls queued back to back (no host synchronisation between them,
    as in a training step, where the host runs ahead of the GPU; triton.testing.do_bench and
    torch.utils.benchmark time this way too). timed() synchronises before every call, so it also
    counts the host time of launching the first kernels while the GPU sits idle."""
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps
