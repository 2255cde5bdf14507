"""MoBA (Mixture of Block Attention) over packed variable-length sequences.

Notation, used in every shape comment of this file and of moba_triton.py:
  T   tokens of the packed batch        N   sequences (cu_seqlens has N + 1 entries)
  H   query heads                       Hkv key/value heads, G = H / Hkv (GQA group)
  D   head dim                          B   moba_chunk_size (block length)
  KS  moba_topk - 1: past blocks a query picks besides its own block
  NB  blocks of the whole batch, numbered globally: sequence after sequence, block after block

Semantics (DESIGN.md, "MoBA"; they match the paper's reference implementation):
  * each sequence is cut into blocks of B tokens, the last one possibly partial;
  * gate score of block i for a query at position t (0-based inside its sequence):
    q . mean(K[block i]) in fp32, unscaled; block i competes only if it is wholly in the
    past, (i + 1) * B <= t;
  * the own block is always attended (causal inside), plus the top KS competing blocks
    (all of them when fewer compete);
  * ties: among equal gate scores the LOWER block index wins (a stable descending order).
    Every implementation here and in moba_triton.py follows this rule. The GPU gate computes
    the fp32 products with tf32x3 tensor-core passes by default (~1e-6 relative; 9x faster than
    its exact CUDA-core variant, which moba_triton keeps as gate_prec="fma"), so a near-tie
    within that error may resolve differently from the CPU path;
  * exact softmax with scale D^-1/2 over the keys of the selected blocks;
  * GQA: the gate of query head h uses the block means of kv head h // G, so selection stays
    per query head;
  * selection carries no gradient (top-k is piecewise constant): gradients flow only through
    the attention over the selected keys.

Three implementations of that one function:
  moba_attn_varlen_reference  dense [H, L, L] masked softmax per sequence, with its own
                              brute-force selection (rank counting, no sort): tests only.
  moba_attn_varlen_gather     block-gather path in plain torch (autograd), memory linear in T:
                              the CPU path (tests, demo).
  moba_triton.moba_attn_varlen_triton  the fused GPU kernels.
moba_attn_varlen dispatches between the last two by device, once per call.
"""
from __future__ import annotations


import torch
from torch import Tensor

__all__ = [
    "moba_attn_varlen",
    "moba_attn_varlen_gather",
    "moba_attn_varlen_reference",
    "moba_select_blocks",
    "select_blocks_at",
]


def moba_attn_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    moba_chunk_size: int,
    moba_topk: int,
    *,
    return_lse: bool = False,
):
    """MoBA attention, flash-attn varlen layout.

    q: [T, H, D], k/v: [T, Hkv, D], cu_seqlens: [N + 1] int (starts at 0, ends at T),
    max_seqlen >= the longest sequence (sizes the GPU grids; the CPU path does not need it).
    Returns out [T, H, D] (and lse [T, H] fp32, natural log, if return_lse).
    CUDA tensors run the Triton kernels; anything else runs the block-gather torch path.
    """
    _check_inputs(q, k, v, cu_seqlens, moba_chunk_size, moba_topk)
    if q.is_cuda:
        # Lazy import: importing megamod.ops must not import triton.
        from megamod.ops.moba_triton import moba_attn_varlen_triton

        return moba_attn_varlen_triton(
            q, k, v, cu_seqlens, max_seqlen, moba_chunk_size, moba_topk, return_lse=return_lse
        )
    return moba_attn_varlen_gather(
        q, k, v, cu_seqlens, max_seqlen, moba_chunk_size, moba_topk, return_lse=return_lse
    )


def _check_inputs(q, k, v, cu_seqlens, chunk, topk):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [T, heads, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"k/v must be [T, Hkv, D] matching q {tuple(q.shape)}; got {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of kv heads {k.shape[1]}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor")
    if chunk < 1 or topk < 1:
        raise ValueError(f"moba_chunk_size ({chunk}) and moba_topk ({topk}) must be >= 1")


# ----------------------------------------------------------------------------------------
# Layout shared by the torch paths
# ----------------------------------------------------------------------------------------


def _block_layout(cu_seqlens: Tensor, chunk: int, device) -> dict:
    """Global block numbering of a packed batch (host-synchronising: torch paths only)."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lens = cu[1:] - cu[:-1]  # [N]
    nblk = (lens + chunk - 1) // chunk  # [N]
    blk_first = torch.cumsum(nblk, 0) - nblk  # [N] global id of each sequence's block 0
    NB = int(nblk.sum())
    T = int(cu[-1])
    blk_seq = torch.repeat_interleave(torch.arange(len(lens), device=device), nblk)  # [NB]
    blk_local = torch.arange(NB, device=device) - blk_first[blk_seq]  # [NB]
    blk_start = cu[blk_seq] + blk_local * chunk  # [NB] first token
    blk_len = torch.minimum(lens[blk_seq] - blk_local * chunk, torch.full_like(blk_start, chunk))
    tok_seq = torch.repeat_interleave(torch.arange(len(lens), device=device), lens)  # [T]
    tok_pos = torch.arange(T, device=device) - cu[tok_seq]  # [T] position inside sequence
    own_blk = blk_first[tok_seq] + tok_pos // chunk  # [T] global id of own block
    return dict(
        lens=lens, nblk=nblk, blk_first=blk_first, NB=NB, T=T, blk_seq=blk_seq,
        blk_start=blk_start, blk_len=blk_len, tok_seq=tok_seq, tok_pos=tok_pos, own_blk=own_blk,
    )


def _block_means(k: Tensor, lay: dict) -> Tensor:
    """[NB, Hkv, D] fp32 mean of the keys of every block."""
    blk_of_tok = lay["own_blk"]
    sums = torch.zeros(lay["NB"], k.shape[1], k.shape[2], dtype=torch.float32, device=k.device)
    sums.index_add_(0, blk_of_tok, k.detach().float())
    return sums / lay["blk_len"].to(torch.float32)[:, None, None]


@torch.no_grad()
def moba_select_blocks(q: Tensor, k: Tensor, cu_seqlens: Tensor, moba_chunk_size: int, moba_topk: int) -> Tensor:
    """[T, H, KS] int64: global ids of the past blocks each query picks, -1 where none.

    Ties: lower block index wins (stable descending sort). Slots are in descending-score order.
    """
    lay = _block_layout(cu_seqlens, moba_chunk_size, q.device)
    means = _block_means(k, lay) if moba_topk > 1 else None  # [NB, Hkv, D]
    zero = torch.zeros(len(cu_seqlens) - 1, dtype=torch.long)
    return select_blocks_at(q, means, cu_seqlens, zero, lay["blk_first"].cpu(), moba_chunk_size, moba_topk)


@torch.no_grad()
def select_blocks_at(q: Tensor, means: Tensor | None, cu_seqlens: Tensor, pos0: Tensor, blk_first: Tensor,
                     moba_chunk_size: int, moba_topk: int) -> Tensor:
    """The gate for runs of queries that need not start a sequence (context parallelism holds
    chunks of one): [T, H, KS] int64 ids into ``means`` of the past blocks each query picks, -1
    where none, slots in descending-score order.

    Run n is rows cu_seqlens[n]:cu_seqlens[n+1] of q at positions pos0[n], pos0[n] + 1, ... of
    its sequence, whose blocks are means[blk_first[n] + i] ([NB, Hkv, D] fp32 block means of K);
    block i competes for the query at position t iff (i + 1)·B <= t. Ties: lower index wins.
    """
    H = q.shape[1]
    KS = moba_topk - 1
    sel = torch.full((q.shape[0], H, max(KS, 0)), -1, dtype=torch.long, device=q.device)
    if KS == 0:
        return sel
    if H > means.shape[1]:
        means = means.repeat_interleave(H // means.shape[1], dim=1)  # [NB, H, D] (GQA: expand for gating)
    for n, (s, e) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        p0, b0 = int(pos0[n]), int(blk_first[n])
        own = (p0 + torch.arange(e - s, device=q.device)) // moba_chunk_size  # [L] own block of each query
        nb = int(own[-1]) if e > s else 0  # blocks 0 .. nb-1 compete for the last query
        if nb < 1:
            continue
        scores = torch.einsum("lhd,jhd->lhj", q[s:e].float(), means[b0 : b0 + nb])  # [L, H, nb]
        elig = torch.arange(nb, device=q.device)[None, None, :] < own[:, None, None]  # (i+1)B <= t <=> i < t//B
        scores = scores.masked_fill(~elig, float("-inf"))
        vals, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
        kk = min(KS, nb)
        sel[s:e, :, :kk] = torch.where(vals[..., :kk] > float("-inf"), idx[..., :kk] + b0, -1)
    return sel


# ----------------------------------------------------------------------------------------
# Dense masked reference (tests only): quadratic memory, independent selection code
# ----------------------------------------------------------------------------------------


def _reference_mask(q_s: Tensor, k_s: Tensor, chunk: int, topk: int) -> Tensor:
    """[H, L, L] bool: key j visible to query i. Brute force, no sort: block b is picked iff it
    competes and fewer than KS competing blocks beat it (higher score, or equal and lower index)."""
    L, H, D = q_s.shape
    Hkv = k_s.shape[1]
    nb = (L + chunk - 1) // chunk
    kpad = torch.zeros(nb * chunk, Hkv, D, dtype=torch.float64, device=k_s.device)
    kpad[:L] = k_s.double()
    cnt = torch.clamp(L - torch.arange(nb, device=k_s.device) * chunk, max=chunk).double()
    means = kpad.view(nb, chunk, Hkv, D).sum(1) / cnt[:, None, None]  # [nb, Hkv, D]
    # The gate is defined in fp32: round the means and the product to fp32 like the fast paths.
    means = means.float().repeat_interleave(H // Hkv, dim=1)  # [nb, H, D]
    scores = torch.einsum("lhd,bhd->hlb", q_s.float(), means)  # [H, L, nb]
    pos = torch.arange(L, device=q_s.device)
    blk = torch.arange(nb, device=q_s.device)
    own = pos // chunk  # [L]
    comp = ((blk[None, :] + 1) * chunk <= pos[:, None])  # [L, nb]
    s_i = scores[:, :, :, None]  # candidate i
    s_j = scores[:, :, None, :]  # rival j
    beats = comp[None, :, None, :] & ((s_j > s_i) | ((s_j == s_i) & (blk[None, :] < blk[:, None])))
    rank = beats.sum(-1)  # [H, L, nb]
    picked = comp[None] & (rank < topk - 1)  # [H, L, nb]
    picked = picked | (blk[None, None, :] == own[None, :, None])  # own block
    key_blk = pos // chunk  # [L]
    mask = picked.gather(2, key_blk[None, None, :].expand(H, L, L))  # [H, L(query), L(key)]
    return mask & (pos[None, None, :] <= pos[None, :, None])  # causal (matters in own block)


def moba_attn_varlen_reference(
    q, k, v, cu_seqlens, max_seqlen, moba_chunk_size, moba_topk, *, return_lse=False
):
    """Dense masked MoBA: O(L^2) memory per sequence. For tests only."""
    _check_inputs(q, k, v, cu_seqlens, moba_chunk_size, moba_topk)
    T, H, D = q.shape
    G = H // k.shape[1]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs, lses = [], []
    cu = cu_seqlens.tolist()
    for n in range(len(cu) - 1):
        s, e = cu[n], cu[n + 1]
        with torch.no_grad():
            mask = _reference_mask(q[s:e].detach(), k[s:e].detach(), moba_chunk_size, moba_topk)
        qs = q[s:e].to(cdt).transpose(0, 1)  # [H, L, D]
        ks = k[s:e].to(cdt).repeat_interleave(G, dim=1).transpose(0, 1)  # [H, L, D]
        vs = v[s:e].to(cdt).repeat_interleave(G, dim=1).transpose(0, 1)  # [H, L, D]
        logits = (qs @ ks.transpose(1, 2)) * D**-0.5  # [H, L, L]
        logits = logits.masked_fill(~mask, float("-inf"))
        lses.append(torch.logsumexp(logits, -1).transpose(0, 1))  # [L, H]
        outs.append((torch.softmax(logits, -1) @ vs).transpose(0, 1))  # [L, H, D]
    out = torch.cat(outs).to(q.dtype)
    return (out, torch.cat(lses).float()) if return_lse else out


# ----------------------------------------------------------------------------------------
# Block-gather path (CPU): memory O(T * H * (B + KS * D))
# ----------------------------------------------------------------------------------------


def moba_attn_varlen_gather(
    q, k, v, cu_seqlens, max_seqlen, moba_chunk_size, moba_topk, *, return_lse=False
):
    """MoBA as two exact softmax pieces merged by log-sum-exp, differentiable through autograd.

    own block : every block is padded to B rows, attention is dense inside a block ([NB, H, B, B]).
    past picks: (query, head, slot) entries are grouped by the block they picked; groups are
                batched in power-of-two size buckets (at most 2x padding), so each bucket is one
                [groups, C, D] x [groups, D, B] product instead of a gathered [entries, B, D] K.
    Each piece yields (row max m, row sum l, unnormalised o); they are merged exactly.
    """
    _check_inputs(q, k, v, cu_seqlens, moba_chunk_size, moba_topk)
    B, KS = moba_chunk_size, moba_topk - 1
    T, H, D = q.shape
    G = H // k.shape[1]
    scale = D**-0.5
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    lay = _block_layout(cu_seqlens, B, dev)
    NB = lay["NB"]
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)

    # -- own block: pad every block to B rows ------------------------------------------------
    slot = torch.arange(B, device=dev)
    tok = lay["blk_start"][:, None] + slot[None, :]  # [NB, B]
    valid = slot[None, :] < lay["blk_len"][:, None]  # [NB, B]
    tok = torch.where(valid, tok, 0)
    qb = qf[tok]  # [NB, B, H, D]
    kb, vb = kf[tok], vf[tok]  # [NB, B, Hkv, D]
    if G > 1:
        kb, vb = kb.repeat_interleave(G, dim=2), vb.repeat_interleave(G, dim=2)  # [NB, B, H, D]
    logits = torch.einsum("nihd,njhd->nhij", qb, kb) * scale  # [NB, H, B, B]
    causal = (slot[None, :] <= slot[:, None])[None, None] & valid[:, None, None, :]  # [NB,1,B,B]
    logits = logits.masked_fill(~causal, float("-inf"))
    m_own = logits.detach().amax(-1)  # [NB, H, B]; finite: the diagonal is always visible
    m_own = torch.where(valid[:, None, :], m_own, 0.0)
    p = torch.exp(logits - m_own[..., None])
    l_own = p.sum(-1)  # [NB, H, B]
    o_own = torch.einsum("nhij,njhd->nihd", p, vb)  # [NB, B, H, D]
    # back to token order [T, ...]: the rows of a block are its tokens, padding rows dropped
    keep = valid.reshape(-1)
    m_tok = m_own.transpose(1, 2).reshape(NB * B, H)[keep]  # [T, H]
    l_tok = l_own.transpose(1, 2).reshape(NB * B, H)[keep]  # [T, H]
    o_tok = o_own.reshape(NB * B, H, D)[keep]  # [T, H, D]

    sel = moba_select_blocks(q, k, cu_seqlens, B, moba_topk) if KS > 0 else None  # [T, H, KS]
    if sel is not None and bool((sel >= 0).any()):  # else: no sequence has a complete past block
        t_idx, h_idx, s_idx = torch.nonzero(sel >= 0, as_tuple=True)  # entries, t-major
        g_idx = sel[t_idx, h_idx, s_idx]
        m_e, l_e, o_e = _past_blocks(qf, kf, vf, lay, t_idx, h_idx, g_idx, B, G, scale)
        row = t_idx * H + h_idx  # [E] flat (t, h)
        m_all = m_tok.reshape(-1).scatter_reduce(0, row, m_e.detach(), "amax").view(T, H)
        w_own = torch.exp(m_tok - m_all)  # [T, H]
        w_e = torch.exp(m_e - m_all.reshape(-1)[row])  # [E]
        l_sum = (l_tok * w_own).reshape(-1).index_add(0, row, l_e * w_e).view(T, H)
        o_sum = (o_tok * w_own[..., None]).reshape(T * H, D).index_add(0, row, o_e * w_e[:, None])
        o_sum = o_sum.view(T, H, D)
    else:
        m_all, l_sum, o_sum = m_tok, l_tok, o_tok
    out = (o_sum / l_sum[..., None]).to(q.dtype)
    if return_lse:
        return out, (m_all + torch.log(l_sum)).float()
    return out


def _past_blocks(qf, kf, vf, lay, t_idx, h_idx, g_idx, B, G, scale):
    """(m, l, o) of each (query, head, picked block) entry: [E], [E], [E, D]."""
    E, D, dev = t_idx.numel(), qf.shape[2], qf.device
    H = qf.shape[1]
    grp = h_idx * lay["NB"] + g_idx  # [E] group = (head, block)
    order = torch.argsort(grp, stable=True)
    grp_sorted = grp[order]
    uniq, counts = torch.unique_consecutive(grp_sorted, return_counts=True)  # [U]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(E, device=dev) - torch.repeat_interleave(starts, counts)  # [E] in sorted order
    m_e = torch.empty(E, dtype=qf.dtype, device=dev)
    l_parts, o_parts, pos_parts = [], [], []
    # bucket groups by size: C = next power of two of the group's count
    bucket = torch.ceil(torch.log2(counts.to(torch.float64))).long()  # [U]
    grp_bucket = torch.repeat_interleave(bucket, counts)  # [E] sorted order
    grp_local = torch.repeat_interleave(torch.arange(len(uniq), device=dev), counts)  # [E]
    for b in torch.unique(bucket).tolist():
        C = 1 << b
        gsel = torch.nonzero(bucket == b).squeeze(1)  # groups of this bucket
        ng = gsel.numel()
        remap = torch.full((len(uniq),), -1, dtype=torch.long, device=dev)
        remap[gsel] = torch.arange(ng, device=dev)
        ent = torch.nonzero(grp_bucket == b).squeeze(1)  # sorted positions in this bucket
        gi, ri = remap[grp_local[ent]], rank[ent]  # [e_b] group slot, row inside group
        src = order[ent]  # original entry id
        # [ng, C] padded index of queries; pad rows point at token 0 and are ignored
        qrow = torch.zeros(ng, C, dtype=torch.long, device=dev)
        qrow[gi, ri] = t_idx[src] * H + h_idx[src]
        gh = uniq[gsel] // lay["NB"]  # [ng] head
        gb = uniq[gsel] % lay["NB"]  # [ng] block
        ktok = lay["blk_start"][gb][:, None] + torch.arange(B, device=dev)[None, :]  # [ng, B]: past blocks are full
        qg = qf.reshape(-1, D)[qrow]  # [ng, C, D]
        kg = kf[ktok, (gh // G)[:, None]]  # [ng, B, D]
        vg = vf[ktok, (gh // G)[:, None]]  # [ng, B, D]
        logits = (qg @ kg.transpose(1, 2)) * scale  # [ng, C, B]
        m = logits.detach().amax(-1)  # [ng, C]
        p = torch.exp(logits - m[..., None])
        l_parts.append(p.sum(-1)[gi, ri])
        o_parts.append((p @ vg)[gi, ri])  # [e_b, D]
        m_e[src] = m[gi, ri]
        pos_parts.append(src)
    pos = torch.cat(pos_parts)
    inv = torch.empty_like(pos)
    inv[pos] = torch.arange(E, device=dev)
    l_e = torch.cat(l_parts)[inv]
    o_e = torch.cat(o_parts)[inv]
    return m_e, l_e, o_e
