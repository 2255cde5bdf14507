"""Offline (no GPU) compile of the MoBA kernels for sm_90: registers, spills, shared memory.

  TRITON_DEFAULT_FP_FUSION=1 python benchmarks/experiments/moba_ptxas_report.py
"""
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository
import megamod.ops.moba_backward as mb  # noqa: E402
import megamod.ops.moba_plan as mp  # noqa: E402
import megamod.ops.moba_triton as mt  # noqa: E402

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
PTR = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "DO": "*bf16", "DK": "*bf16", "DV": "*bf16", "O": "*fp32",
       "DQ": "*fp32", "MEAN": "*fp32", "LSE": "*fp32", "DELTA": "*fp32", "DLSE": "*fp32"}


def report(fn, const, num_warps, num_stages=3, floats=(), ptr=None):
    names = fn.arg_names
    sig = {}
    for n in names:
        if n in const:
            sig[n] = "constexpr"
        elif n in {**PTR, **(ptr or {})}:
            sig[n] = {**PTR, **(ptr or {})}[n]
        elif n.isupper() and n not in ("G", "D", "H", "KS", "NBT", "NKT"):
            sig[n] = "*i32"
        elif n in floats:
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True)
    info = " ".join(re.findall(r"REG:\d+|STACK:\d+|SHARED:\d+|LOCAL:\d+", out.stdout))
    mma = "wgmma" if "wgmma" in k.asm["ptx"] else ("mma" if "mma.sync" in k.asm["ptx"] else "no-mma")
    print(f"{fn.__name__:18s} {const} w={num_warps} s={num_stages}: smem {k.metadata.shared} B; {info}; {mma}")


if __name__ == "__main__":
    fs = ("qk_scale", "sm_scale")
    cfg = mt.GPU_CFG
    bf16_mean = {"MEAN": "*bf16"} if cfg["gate_prec"] == "bf16split" else None  # means as three bf16 parts
    report(mp._gate_kernel, dict(CHUNK=512, KS=2, KSP=2, BLOCK_D=128, BM=cfg["gate_bm"], NBLK=cfg["gate_nblk"],
                                 DC=cfg["gate_dc"], PREC=cfg["gate_prec"], KEY=True), cfg["gate_warps"],
           cfg["gate_stages"], ptr=bf16_mean)
    own = {"fwd": (mt._fwd_own_kernel, dict(HAS_PAST=True), {"O32": "*fp32", "OUT": "*bf16"}),
           "dq": (mb._dq_own_kernel, dict(HAS_PAST=True, HAS_DLSE=False),
                  {"O": "*bf16", "DQ32": "*fp32", "DQ": "*bf16"})}
    for pre, (kern, flags, ptrs) in own.items():
        report(kern, dict(CHUNK=512, BLOCK_D=128, BM=cfg[f"{pre}_bm"], BN=cfg[f"{pre}_bn"], ALIGNED=True, PREC="tf32",
                          **flags), cfg[f"{pre}_warps"], cfg[f"{pre}_stages"], fs, ptr=ptrs)
    past = {"fwd": (mt._fwd_past_kernel, {"O": "*fp32", "OUT": "*bf16"}),
            "dq": (mb._dq_past_kernel, {"DQ32": "*fp32", "DQ": "*bf16"})}
    for pre, (kern, ptrs) in past.items():
        for tma in (False, True):  # the K/V tiles by pointer loads, or through [BN, D] TMA descriptors
            desc = f"tensordesc<bf16[{cfg[f'{pre}_bn']}, 128]>" if tma else "*bf16"
            report(kern, dict(CHUNK=512, BLOCK_D=128, BM=cfg[f"{pre}_bm"], BN=cfg[f"{pre}_bn"], EVEN=True, LAST=False,
                              PREC="tf32", TMA=tma), cfg[f"{pre}_warps"], cfg[f"{pre}_stages"], fs,
                   ptr={**ptrs, "DESC_K": desc, "DESC_V": desc})
    report(mb._dkdv_kernel, dict(BLOCK_D=128, BM=cfg["kv_bm"], BN=cfg["kv_bn"], PREC="tf32", EVEN_D=True, ROW64=False),
           cfg["kv_warps"], cfg["kv_stages"], fs)
