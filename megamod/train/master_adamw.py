"""AdamW over bf16 weights with fp32 master weights, one fused pass a step (train.bf16_mode master_fused).

The autocast recipe keeps fp32 weights and pays for it every micro-batch: each matrix is cast
to bf16 in the forward, each bf16 weight gradient is cast back to fp32 in the backward, the
residual stream is fp32, and the optimizer step is a separate pass over fp32 weights and
gradients. Here the module holds bf16 weights (so the residual stream is bf16, as in
Megatron-LM's default), and this optimizer holds what must stay fp32: the master weights and
both moments, in flat buffers padded so that every parameter starts on a chunk of ``BLOCK``
elements. One kernel a parameter group reads the gradient, the master weight and the moments
and writes the master, the moments and the bf16 weight: 28 bytes a parameter, the same traffic
as the fp32 fused AdamW alone, with no cast passes left anywhere.

Gradients:
- one micro-batch a step: the kernel reads autograd's bf16 ``.grad`` tensors where they lie,
  through a table of their addresses (written each step; the tensors move);
- several: a post-accumulate-grad hook adds each bf16 gradient into a flat fp32 buffer
  (Megatron's ``main_grad``) and frees it, so the sum is not rounded to bf16 per micro-batch.

Clipping by the global norm and the skip of a non-finite step happen inside the kernel from
device scalars (no host sync), as in ``ClippingAdamW``. State (master weights, moments, step)
is in ``state_dict`` under each parameter, so DeepSpeed checkpoints it at ZeRO 0 with nothing
lost; ``param_names`` in the groups lets ``checkpoint.consolidated_state_dict`` take the fp32
master weights rather than the bf16 copies.

On CPU (tests, debug runs) the same update runs in torch (``_update_torch``); the kernel runs on
CUDA and, for the tests, in Triton's interpreter.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import triton
import triton.language as tl

from megamod.train.clipping import clip_and_skip

BLOCK = 4096  # elements a program updates; every parameter starts on a multiple of it


@triton.jit
def _adamw_kernel(grad_ptrs, chunk_param, param_start, param_numel, weight, master, exp_avg, exp_avg_sq,
                  step_ptr, scale_ptr, skip_ptr, chunk0, lr, beta1, beta2, log2_beta1, log2_beta2, eps,
                  weight_decay, GRAD_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    c = (chunk0 + tl.program_id(0)).to(tl.int64)
    i = tl.load(chunk_param + c)  # the parameter this chunk belongs to
    within = c * BLOCK - tl.load(param_start + i) + tl.arange(0, BLOCK)  # element offsets inside it
    gaddr = tl.load(grad_ptrs + i)  # 0: no gradient this step; the parameter is left as it is
    live = within < tl.where(gaddr != 0, tl.load(param_numel + i), 0)
    g = tl.load(gaddr.to(tl.pointer_type(GRAD_DTYPE)) + within, mask=live, other=0.0).to(tl.float32)
    flat = c * BLOCK + tl.arange(0, BLOCK)
    p, m, v = tl.load(master + flat), tl.load(exp_avg + flat), tl.load(exp_avg_sq + flat)

    step = tl.load(step_ptr)  # already counts this step (unless it is skipped)
    g = g / tl.load(scale_ptr)  # clipping: scale = max(1, ‖g‖ / max_norm)
    live = live & (tl.zeros_like(within) + tl.load(skip_ptr) == 0)  # a non-finite norm skips the step
    p_new = p * (1.0 - lr * weight_decay)
    m_new = m + (1.0 - beta1) * (g - m)
    v_new = beta2 * v + (1.0 - beta2) * g * g
    step_size = lr / (1.0 - tl.exp2(step * log2_beta1))
    denom = tl.sqrt(v_new) / tl.sqrt(1.0 - tl.exp2(step * log2_beta2)) + eps
    p_new = p_new - step_size * (m_new / denom)

    p, m, v = tl.where(live, p_new, p), tl.where(live, m_new, m), tl.where(live, v_new, v)
    tl.store(master + flat, p)
    tl.store(exp_avg + flat, m)
    tl.store(exp_avg_sq + flat, v)
    tl.store(weight + flat, p.to(tl.bfloat16, fp_downcast_rounding="rtne"))  # as torch rounds


_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


class MasterAdamW(torch.optim.Optimizer):
    """AdamW (torch's semantics, decoupled weight decay) for bf16 parameters with fp32 master
    weights and moments; clips by the global gradient norm ``max_norm`` (0: off) inside the step.

    Takes the parameters in fp32 (as built) and turns them into bf16 views of one flat buffer,
    keeping the fp32 values as master weights. ``accumulate``: gradients of several micro-batches
    are summed in fp32 before the step (set when grad_accum > 1). One device, one model replica:
    the engine allows this optimizer only where no gradient has to be reduced or shared.
    """

    def __init__(self, params, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 max_norm: float, accumulate: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.max_norm = max_norm
        self._params = [p for g in self.param_groups for p in g["params"]]
        dev = self._params[0].device
        if any(p.device != dev or not p.is_floating_point() for p in self._params):
            raise ValueError("MasterAdamW: every parameter must be a floating-point tensor on one device")
        chunks = [math.ceil(p.numel() / BLOCK) for p in self._params]  # of each parameter
        firsts = list(itertools.accumulate(chunks, initial=0))  # each parameter's first chunk
        starts = [BLOCK * c for c in firsts[:-1]]
        total = BLOCK * sum(chunks)
        n = len(self._params)
        self._master = torch.zeros(total, dtype=torch.float32, device=dev)
        self._weight = torch.zeros(total, dtype=torch.bfloat16, device=dev)
        self._exp_avg, self._exp_avg_sq = torch.zeros_like(self._master), torch.zeros_like(self._master)
        self._step = torch.zeros((), dtype=torch.float32, device=dev)
        self._views: list[tuple[slice, torch.Size]] = []
        for p, s in zip(self._params, starts):
            span = slice(s, s + p.numel())
            with torch.no_grad():
                self._master[span].copy_(p.detach().reshape(-1))
                self._weight[span].copy_(self._master[span])
            p.data = self._weight[span].view(p.shape)
            self._views.append((span, p.shape))
            self.state[p] = {"step": self._step, "master": self._master[span].view(p.shape),
                             "exp_avg": self._exp_avg[span].view(p.shape),
                             "exp_avg_sq": self._exp_avg_sq[span].view(p.shape)}
        # kernel tables: chunk -> parameter, parameter -> first element and size; group -> chunks
        self._chunk_param = torch.repeat_interleave(torch.arange(n, dtype=torch.int32),
                                                    torch.tensor(chunks)).to(dev)
        self._param_start = torch.tensor(starts, dtype=torch.int64, device=dev)
        self._param_numel = torch.tensor([p.numel() for p in self._params], dtype=torch.int64, device=dev)
        bounds = list(itertools.accumulate((len(g["params"]) for g in self.param_groups), initial=0))  # group -> params
        self._group_chunks = [(firsts[a], firsts[b]) for a, b in zip(bounds, bounds[1:])]
        # the gradient address table goes up through pinned host buffers, two in turn, so that
        # no step waits on the device (an event says when a buffer's last copy is done)
        pin = dev.type == "cuda"
        self._ptr_host = [torch.zeros(n, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._ptr_done: list[Any] = [None, None]
        self._ptr_dev = torch.zeros(n, dtype=torch.int64, device=dev)
        self._turn = 0
        self._global_grad_norm: torch.Tensor | None = None
        self._update = self._update_triton if dev.type == "cuda" else self._update_torch
        self._main_grad: torch.Tensor | None = None
        self._seen: set[int] = set()
        if accumulate:
            self._main_grad = torch.zeros_like(self._master)
            for i, p in enumerate(self._params):
                p.register_post_accumulate_grad_hook(self._make_accumulate_hook(i))

    # ---- gradients -------------------------------------------------------------------------------
    def _make_accumulate_hook(self, i: int):
        span, shape = self._views[i]

        def hook(p: torch.Tensor) -> None:
            main = self._main_grad[span].view(shape)
            if i in self._seen:
                main.add_(p.grad)
            else:  # the first micro-batch of the step writes, so the buffer needs no zeroing
                main.copy_(p.grad)
                self._seen.add(i)
            p.grad = None

        return hook

    def _grads(self) -> list[torch.Tensor | None]:
        """This step's gradient of each parameter (None: it got none), bf16 or fp32."""
        if self._main_grad is None:
            return [p.grad for p in self._params]
        return [self._main_grad[span].view(shape) if i in self._seen else None
                for i, (span, shape) in enumerate(self._views)]

    # ---- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterAdamW does not take a closure")
        grads = self._grads()
        present = [g for g in grads if g is not None]
        if not present:
            return None
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(present, 2.0, dtype=torch.float32)))
        self._global_grad_norm = norm  # where DeepSpeed's engine looks for the norm it reports
        scale, skip = clip_and_skip(norm, self.max_norm)
        scale = torch.ones_like(norm) if scale is None else scale
        self._step.add_(1.0 - skip)  # a skipped step does not count for the bias correction
        self._update(grads, scale, skip)
        self._seen.clear()
        return None

    def _upload_grad_ptrs(self, grads: list[torch.Tensor | None]) -> None:
        ptrs = torch.tensor([0 if g is None else g.data_ptr() for g in grads], dtype=torch.int64)
        if self._ptr_dev.device.type != "cuda":
            self._ptr_dev.copy_(ptrs)
            return
        turn = self._turn
        if self._ptr_done[turn] is not None:
            self._ptr_done[turn].synchronize()  # two steps old: long done
        self._ptr_host[turn].copy_(ptrs)
        self._ptr_dev.copy_(self._ptr_host[turn], non_blocking=True)
        self._ptr_done[turn] = torch.cuda.Event()
        self._ptr_done[turn].record()
        self._turn ^= 1

    def _update_triton(self, grads, scale: torch.Tensor, skip: torch.Tensor) -> None:
        # the kernel reads a gradient as the parameter's flat layout (autograd keeps .grad in it)
        grads = [None if g is None else g.contiguous() for g in grads]
        self._upload_grad_ptrs(grads)
        gdtype = _TL_DTYPE[next(g for g in grads if g is not None).dtype]
        for group, (c0, c1) in zip(self.param_groups, self._group_chunks):
            if c1 == c0:
                continue
            beta1, beta2 = group["betas"]
            _adamw_kernel[(c1 - c0,)](
                self._ptr_dev, self._chunk_param, self._param_start, self._param_numel, self._weight, self._master,
                self._exp_avg, self._exp_avg_sq, self._step, scale, skip, c0, group["lr"], beta1, beta2,
                math.log2(beta1), math.log2(beta2), group["eps"], group["weight_decay"],
                GRAD_DTYPE=gdtype, BLOCK=BLOCK, num_warps=8)

    def _update_torch(self, grads, scale: torch.Tensor, skip: torch.Tensor) -> None:
        """The kernel's update in torch ops, per parameter (CPU runs and the kernel's reference)."""
        params = iter(zip(self._params, grads))
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            bc1, bc2 = 1 - beta1 ** self._step, 1 - beta2 ** self._step
            for _ in group["params"]:
                p, g = next(params)
                if g is None:
                    continue
                st = self.state[p]
                w, m, v = st["master"], st["exp_avg"], st["exp_avg_sq"]
                g = g.float() / scale
                w_new = w * (1 - lr * wd)
                m_new = m + (1 - beta1) * (g - m)
                v_new = beta2 * v + (1 - beta2) * g * g
                w_new = w_new - (lr / bc1) * (m_new / (v_new.sqrt() / bc2.sqrt() + eps))
                keep = skip != 0
                w.copy_(torch.where(keep, w, w_new))
                m.copy_(torch.where(keep, m, m_new))
                v.copy_(torch.where(keep, v, v_new))
                p.copy_(w)

    # ---- checkpoints -----------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Into the flat buffers (torch's own would cast the fp32 master weights to the bf16
        parameters' dtype); the bf16 weights are rewritten from the loaded master weights."""
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("MasterAdamW: the checkpoint's optimizer has other parameter groups than this "
                             "model's; resume with the checkpoint's model and optimizer flags")
        for mine, saved in zip(self.param_groups, groups):
            mine.update({k: v for k, v in saved.items() if k != "params"})
        if state_dict["state"] and not any("master" in st for st in state_dict["state"].values()):
            raise ValueError("this checkpoint's optimizer holds no fp32 master weights (it was written with another "
                             "--train.bf16_mode, whose weights are in the module file); resume it with that "
                             "--train.bf16_mode, or start a new --train.run_dir")
        for i, (p, (span, shape)) in enumerate(zip(self._params, self._views)):
            st = state_dict["state"].get(i) or state_dict["state"].get(str(i))
            if st is None or tuple(st["master"].shape) != tuple(shape):
                raise ValueError(f"MasterAdamW: parameter {i} ({tuple(shape)}) has no matching state in the "
                                 f"checkpoint; it was written for another model")
            for key in ("master", "exp_avg", "exp_avg_sq"):
                self.state[p][key].copy_(st[key])
            self._step.copy_(st["step"])
        with torch.no_grad():
            self._weight.copy_(self._master)
