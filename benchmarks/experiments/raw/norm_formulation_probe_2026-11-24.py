"""A/B in one process: nn.RMSNorm (aten _fused_rms_norm, decomposed by inductor) vs the same norm
written out in fp32 ops, through the trainer step (c) of train_throughput (session 6)."""
import sys, json
sys.path.insert(0, "benchmarks")
import torch
from torch import nn
import train_throughput as tt
import megamod.compat, megamod.model.gpt as gpt


class PlainRMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).type_as(x)


args = tt.argparse.Namespace(flavour="1b", d=2048, layers=22, heads=16, ffn=5632, vocab=32000, seq=2048, micro_batch=8,
                             steps=12, warmup=3, compile=True, ac=False, profile=None, profile_variant="c", overrides=[],
                             variant="c")
dev = torch.device("cuda")
order = sys.argv[1:] or ["aten", "plain", "aten", "plain"]
for which in order:
    gpt.build_rms_norm = (lambda d, e: PlainRMSNorm(d, e)) if which == "plain" else megamod.compat.build_rms_norm
    torch._dynamo.reset()
    r = tt.bench_megamod(args, dev, 0)
    print(which, f"{r['step_ms']:.1f} ms (p10 {r['p10_ms']:.1f}, p90 {r['p90_ms']:.1f}), {r['peak_mem_gib']:.1f} GiB", flush=True)
