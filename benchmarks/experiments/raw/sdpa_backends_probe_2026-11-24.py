"""Causal attention fwd+bwd at the 1b training shape (B 8, H 16, S 2048, D 128, bf16) on each
SDPA backend and FlexAttention: which is fastest on this GPU (issue 9, session 6)."""
import torch, time
from torch.nn.attention import sdpa_kernel, SDPBackend
from torch.nn.attention.flex_attention import flex_attention, create_block_mask
B, H, S, D = 8, 16, 2048, 128
dev = "cuda"
q, k, v = (torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16).transpose(1, 2).requires_grad_() for _ in range(3))
do = torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16)
fl = 4 * B * H * S * S * D / 2  # causal fwd
def timeit(f, n=20):
    for _ in range(3): f()
    torch.cuda.synchronize(); es = []
    for _ in range(n):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True); a.record(); f(); b.record(); torch.cuda.synchronize(); es.append(a.elapsed_time(b))
    es.sort(); return es[n // 2]
ref = None
for name, be in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
    try:
        with sdpa_kernel([be]):
            fwd = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            tf = timeit(fwd)
            def fb():
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True); o.backward(do)
            tfb = timeit(fb)
            o = fwd()
        if ref is None: ref = o.float()
        print(f"{name:10s} fwd {tf:.3f} ms ({fl/tf/1e9:.0f} TFLOP/s)  fwd+bwd {tfb:.3f} ms  bwd {tfb-tf:.3f} ms ({2.5*fl/(tfb-tf)/1e9:.0f} TFLOP/s)  max|o-cudnn| {(o.float()-ref).abs().max().item():.3e}")
    except Exception as e:
        print(name, "failed:", type(e).__name__, str(e)[:200])
mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, S, S, device=dev)
cf = torch.compile(flex_attention)
for opts in [None, {"BLOCK_M": 128, "BLOCK_N": 64}, {"BLOCK_M": 64, "BLOCK_N": 128}]:
    try:
        fwd = lambda: cf(q, k, v, block_mask=mask, kernel_options=opts)
        tf = timeit(fwd)
        def fb():
            o = cf(q, k, v, block_mask=mask, kernel_options=opts); o.backward(do)
        tfb = timeit(fb)
        o = fwd()
        print(f"flex {str(opts):32s} fwd {tf:.3f} ms ({fl/tf/1e9:.0f})  fwd+bwd {tfb:.3f} ms  bwd {tfb-tf:.3f} ms ({2.5*fl/(tfb-tf)/1e9:.0f})  max|o-cudnn| {(o.float()-ref).abs().max().item():.3e}")
    except Exception as e:
        print("flex", opts, "failed:", type(e).__name__, str(e)[:200])
