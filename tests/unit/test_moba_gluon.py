"""The Gluon dK/dV kernel (megamod/ops/moba_gluon.py). Gluon has no CPU interpreter, so CI compiles it
for sm_90 offline with the installed Triton (ptxas ships with it) and checks that the schedule it was
written for survived: asynchronous wgmma with a wait that leaves one product in flight. Its numbers
are checked against the dense reference on the GPU (benchmarks/moba_check.py); on the CPU the
backward must not pick it."""
import os
import re
import subprocess
import tempfile

import pytest
import torch


@pytest.mark.parametrize("D, own", [(64, True), (128, True), (128, False)])  # own off: CP's picked-only blocks
def test_gluon_dkdv_compiles_for_hopper_with_overlapped_wgmma(D, own):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from megamod.ops import moba_gluon as mg

    fn = mg._dkdv_gluon_kernel
    ptrs = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "DO": "*bf16", "DK": "*bf16", "DV": "*bf16", "LSE": "*fp32",
            "DELTA": "*fp32", "TOK": "*i32", "SEG_START": "*i32", "BLK_START": "*i32", "BLK_LEN": "*i32"}
    const = dict(D=D, BM=mg.BM, BN=mg.BN, TPW_D=D // 8, OWN=own, num_warps=mg.NUM_WARPS)
    sig = {n: "constexpr" if n in const else ptrs.get(n, "fp32" if n.endswith("scale") else "i32")
           for n in fn.arg_names}
    # as the JIT specializes a launch: pointers and the row strides of q/k (multiples of the head dim)
    # are multiples of 16; lse's row stride is the head count, any value
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n in ptrs or n in ("stride_qt", "stride_qh", "stride_kt", "stride_kh")}
    k = triton.compile(GluonASTSource(fn, sig, const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=mg.NUM_WARPS))
    ptx = k.asm["ptx"]
    assert "wgmma.mma_async" in ptx
    waits = re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx)
    assert "1" in waits and "0" in waits, waits  # dP (and dV) stay in flight across the softmax
    assert "cp.async" in ptx
    # registers: within the 255 a thread can have at 8 warps (ptxas spills rather than fail, so
    # this reads the resource usage of the cubin)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", out).group(1))
    assert regs <= 255, out
    assert k.metadata.shared <= 227 * 1024  # one H100 SM's shared memory


def test_gluon_dkdv_is_not_chosen_off_hopper():
    from megamod.ops import moba_gluon as mg

    q = torch.zeros(8, 2, 128, dtype=torch.bfloat16)
    tok = torch.zeros(4, dtype=torch.int32)
    assert not mg.supported(q, q, tok)  # CPU tensors
    assert not mg.supported(q.float(), q.float(), tok)


def test_a_triton_without_gluon_falls_back_to_the_triton_kernel(monkeypatch):
    import sys

    from megamod.ops import moba_backward as mb

    import megamod.ops

    mb._moba_gluon.cache_clear()
    monkeypatch.setitem(sys.modules, "megamod.ops.moba_gluon", None)  # the import raises ImportError
    monkeypatch.delattr(megamod.ops, "moba_gluon", raising=False)
    try:
        assert mb._moba_gluon() is None
    finally:
        mb._moba_gluon.cache_clear()
    monkeypatch.undo()
    assert mb._moba_gluon() is not None
