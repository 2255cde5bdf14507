"""MoBA on the GPU, part 1: the plan — which block every query picks, and the work lists.

Steps 0-3 of megamod/ops/moba_triton.py's docstring (the attention kernels that consume the plan
live there and in moba_backward.py): the block table of the packed batch, the block means of K, the
gate (fp32 scores against the block means, running top-KS, sort keys of the (query, head, slot)
entries), the sort of the entries into per-(head, block, slot) segments, and the tile schedule of
the slot passes; also what the forward and backward kernels share (_query_tile, _slot_tile,
_store_own, _prec, LOG2E).
All device work, a few launches, no host synchronisation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

# ----------------------------------------------------------------------------------------
# plan: block table, sorted entries, tile schedule (a few launches, no host synchronisation)
# ----------------------------------------------------------------------------------------


@triton.jit
def _blocks_kernel(CU, BLK_START, BLK_LEN, BLK_FIRST, N, NBT, CHUNK: tl.constexpr, R: tl.constexpr,
                   SP: tl.constexpr):
    """Global block table: block g of the packed batch starts at BLK_START[g] and holds BLK_LEN[g]
    tokens (0 for the unused ids up to NBT); BLK_FIRST[n] is the id of sequence n's block 0."""
    g = tl.program_id(0) * R + tl.arange(0, R)
    start = tl.zeros([R], tl.int32)
    blen = tl.zeros([R], tl.int32)
    carry = tl.full([], 0, tl.int32)
    for n0 in range(0, N, SP):
        n = n0 + tl.arange(0, SP)
        c0 = tl.load(CU + n, mask=n < N, other=0)
        c1 = tl.load(CU + n + 1, mask=n < N, other=0)
        nb = (c1 - c0 + CHUNK - 1) // CHUNK
        excl = tl.cumsum(nb, 0) - nb + carry
        if tl.program_id(0) == 0:
            tl.store(BLK_FIRST + n, excl, mask=n < N)
        hit = (excl[None, :] <= g[:, None]) & (g[:, None] < excl[None, :] + nb[None, :])  # [R, SP]
        st = c0[None, :] + (g[:, None] - excl[None, :]) * CHUNK
        start += tl.sum(tl.where(hit, st, 0), 1)
        blen += tl.sum(tl.where(hit, tl.minimum(c1[None, :] - st, CHUNK), 0), 1)
        carry += tl.sum(nb, 0)
    tl.store(BLK_START + g, start, mask=g < NBT)
    tl.store(BLK_LEN + g, blen, mask=g < NBT)


@triton.jit
def _entries_kernel(PERM, SKEY, TOK, BOUNDS, E, NSEG, HKS, NLOG, NPE, R: tl.constexpr):
    """After the sort: TOK[i] = token of sorted entry i; BOUNDS[seg] = first entry with key >= seg
    (binary search), so segment seg holds entries [BOUNDS[seg], BOUNDS[seg + 1])."""
    pid = tl.program_id(0)
    if pid < NPE:
        i = pid.to(tl.int64) * R + tl.arange(0, R)
        p = tl.load(PERM + i, mask=i < E, other=0)
        tl.store(TOK + i, (p // HKS).to(tl.int32), mask=i < E)
    else:
        seg = (pid - NPE) * R + tl.arange(0, R)
        lo = tl.zeros([R], tl.int64)
        hi = tl.zeros([R], tl.int64) + E
        for _ in range(NLOG):
            mid = (lo + hi) // 2
            v = tl.load(SKEY + mid, mask=mid < hi, other=0)
            right = (mid < hi) & (v < seg)
            lo = tl.where(right, mid + 1, lo)
            hi = tl.where(right | (mid >= hi), hi, mid)
        tl.store(BOUNDS + seg, lo.to(tl.int32), mask=seg <= NSEG)


@triton.jit
def _tile_prefix_kernel(BOUNDS, TILE_FIRST, PASS_LO, HN, KS, BM: tl.constexpr, R: tl.constexpr):
    """One program: tiles of BM entries per segment, numbered pass-major (pass s, then head and
    block); TILE_FIRST[seg] = the segment's first tile, pass s owns [PASS_LO[s], PASS_LO[s + 1])."""
    carry = tl.full([], 0, tl.int32)
    for i0 in range(0, KS * HN, R):
        i = i0 + tl.arange(0, R)  # pass-major index s * HN + (h * NBT + g)
        ok = i < KS * HN
        seg = (i % HN) * KS + i // HN
        cnt = tl.load(BOUNDS + seg + 1, mask=ok, other=0) - tl.load(BOUNDS + seg, mask=ok, other=0)
        nt = (cnt + BM - 1) // BM
        excl = tl.cumsum(nt, 0) - nt + carry
        tl.store(TILE_FIRST + seg, excl, mask=ok)
        tl.store(PASS_LO + i // HN, excl, mask=ok & (i % HN == 0))
        carry += tl.sum(nt, 0)
    tl.store(PASS_LO + KS, carry)


@triton.jit
def _tile_seg_kernel(BOUNDS, TILE_FIRST, TILE_SEG, BM: tl.constexpr, R: tl.constexpr):
    """TILE_SEG[t] = the segment of tile t (one program per segment)."""
    seg = tl.program_id(0)
    nt = (tl.load(BOUNDS + seg + 1) - tl.load(BOUNDS + seg) + BM - 1) // BM
    first = tl.load(TILE_FIRST + seg)
    for j0 in range(0, nt, R):
        j = j0 + tl.arange(0, R)
        tl.store(TILE_SEG + first + j, tl.zeros([R], tl.int32) + seg, mask=j < nt)


# ----------------------------------------------------------------------------------------
# gating
# ----------------------------------------------------------------------------------------


LOG2E = 1.4426950408889634  # the kernels work in base 2, log2(e) folded into the scale


def _prec(dtype):
    """tl.dot input precision of the attention kernels: exact fp32 products for fp32 inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _query_tile(CU, BM: tl.constexpr):
    """Grid (query tiles, sequences, heads) over a packed batch: this program's sequence n, head h,
    the sequence's first row s0 and length L, the tile's first position m0 and its BM positions
    (inside the sequence) and rows (in the packed batch, int64). The caller returns if m0 >= L."""
    n = tl.program_id(1)
    s0 = tl.load(CU + n)
    m0 = tl.program_id(0) * BM
    pos = m0 + tl.arange(0, BM)
    return n, tl.program_id(2), s0, tl.load(CU + n + 1) - s0, m0, pos, (s0 + pos).to(tl.int64)


@triton.jit
def _slot_tile(tile, TOK, SEG_START, TILE_SEG, TILE_FIRST, KS, NBT, BM: tl.constexpr):
    """Tile `tile` of a slot pass (forward and dQ; see _tiles): its BM entry indices r inside the
    segment, the segment's block g and head h, which entries exist (ok) and their rows (int64)."""
    seg = tl.load(TILE_SEG + tile)
    r = (tile - tl.load(TILE_FIRST + seg)) * BM + tl.arange(0, BM)
    seg_lo = tl.load(SEG_START + seg)
    ok = r < tl.load(SEG_START + seg + 1) - seg_lo
    rows = tl.load(TOK + seg_lo.to(tl.int64) + r, mask=ok, other=0).to(tl.int64)
    return r, (seg // KS) % NBT, seg // (KS * NBT), ok, rows  # seg = (h * NBT + g) * KS + s


@triton.jit
def _store_own(X32, X, ptr, x, pos, m0, mask, CHUNK: tl.constexpr, HAS_PAST: tl.constexpr):
    """The store of an own-block pass (run before the slot passes, forward and dQ): with HAS_PAST
    the rows with picks (position >= CHUNK) go in fp32 to X32, the state the slot passes add to,
    the first block's rows to X in its dtype; without, every row goes to X."""
    if HAS_PAST:
        past = (pos >= CHUNK)[:, None]
        tl.store(X32 + ptr, x, mask=mask & past)
        if m0 < CHUNK:  # the tile holds rows of the first block
            tl.store(X + ptr, x.to(X.dtype.element_ty), mask=mask & ~past)
    else:
        tl.store(X + ptr, x.to(X.dtype.element_ty), mask=mask)


@triton.jit
def _block_mean_kernel(K, MEAN, BLK_START, BLK_LEN, stride_kt, stride_kh, stride_mg, stride_mh, stride_mp,
                       D, BLOCK_D: tl.constexpr, BR: tl.constexpr, SPLIT: tl.constexpr):
    """Mean of K per (block, kv head), fp32; SPLIT: stored as three bf16 parts hi + mid + lo (each the
    bf16 rounding of what the previous ones leave), which add up to the fp32 mean to ~2^-24."""
    g = tl.program_id(0)
    hk = tl.program_id(1)
    start = tl.load(BLK_START + g).to(tl.int64)
    blen = tl.load(BLK_LEN + g)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BR, BLOCK_D], dtype=tl.float32)
    for r0 in range(0, blen, BR):
        r = r0 + tl.arange(0, BR)
        ptr = K + (start + r)[:, None] * stride_kt + hk * stride_kh + offs_d[None, :]
        acc += tl.load(ptr, mask=(r[:, None] < blen) & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    mean = tl.sum(acc, 0) / tl.maximum(blen, 1).to(tl.float32)
    mptr = MEAN + g * stride_mg + hk * stride_mh + offs_d
    if SPLIT:
        hi = mean.to(tl.bfloat16)
        rest = mean - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
        tl.store(mptr, hi, mask=offs_d < D)
        tl.store(mptr + stride_mp, mid, mask=offs_d < D)
        tl.store(mptr + 2 * stride_mp, lo, mask=offs_d < D)
    else:
        tl.store(mptr, mean, mask=offs_d < D)


@triton.jit
def _gate_kernel(Q, MEAN, SEL, CU, BLK_FIRST, POS0, stride_qt, stride_qh, stride_mg, stride_mh, stride_mp, stride_st,
                 stride_sh, G, D, NBT, CHUNK: tl.constexpr, KS: tl.constexpr, KSP: tl.constexpr,
                 BLOCK_D: tl.constexpr, BM: tl.constexpr, NBLK: tl.constexpr, DC: tl.constexpr,
                 PREC: tl.constexpr, KEY: tl.constexpr, HAS_POS0: tl.constexpr):
    """PREC "fma": exact fp32 products and sums on the CUDA cores, DC dims at a time (tl.dot with
    "ieee" keeps whole rows in registers and spills). "tf32x3"/"bf16x3": tensor cores with fp32
    operands split in three, fp32 accumulation (error ~1e-6 relative). "bf16split" (bf16 q only):
    q is exact in bf16 and the means come split in three bf16 parts (_block_mean_kernel SPLIT), so
    three bf16 products, each exact, accumulated in fp32 (smallest part first) give the fp32 score
    at twice tf32's tensor-core rate, with q kept as loaded (no split per chunk).

    Writes SEL[t, h, s]: the global block id of pick s, or -1; with KEY the sort key of the entry
    instead: segment id (h * NBT + block) * KS + s, or NSEG = KS * H * NBT for no pick.
    Slot order (the slot passes rely on it): a row with p < KS picks holds them in the LAST p
    slots, because an empty slot is filled from the highest column down and a filled slot never
    empties. p = min(KS, t // CHUNK) for the row at position t: every competing block is picked
    when fewer than KS compete (scores are finite).

    HAS_POS0 (context parallelism: a run of queries that starts inside its sequence): run n's
    queries sit at positions POS0[n] + i of the sequence whose block means start at BLK_FIRST[n]."""
    n, h, s0, L, m0, pos, rows = _query_tile(CU, BM)
    if m0 >= L:
        return
    p0 = tl.load(POS0 + n) if HAS_POS0 else 0
    own = (pos + p0) // CHUNK  # block j competes for row r iff j < own[r]  ((j+1)B <= t)
    offs_d = tl.arange(0, BLOCK_D)
    qrow = Q + rows * stride_qt + h * stride_qh  # [BM] row pointers
    if PREC != "fma":
        q = tl.load(qrow[:, None] + offs_d[None, :], mask=(pos[:, None] < L) & (offs_d[None, :] < D), other=0.0)
        if PREC != "bf16split":  # bf16split multiplies q as loaded (exact in bf16)
            q = q.to(tl.float32)
    b0 = tl.load(BLK_FIRST + n)
    nc = (tl.minimum(L, m0 + BM) - 1 + p0) // CHUNK  # blocks 0..nc-1 compete for some row
    cols = tl.arange(0, KSP)
    # running top-KS per row; padding columns hold +inf so they are never the minimum
    topv = tl.where(cols[None, :] < KS, float("-inf"), float("inf")) + tl.zeros([BM, KSP], tl.float32)
    topi = tl.full([BM, KSP], -1, tl.int32)
    hk = h // G
    for j0 in range(0, nc, NBLK):
        jj = j0 + tl.arange(0, NBLK)
        mrow = MEAN + (b0 + jj).to(tl.int64) * stride_mg + hk * stride_mh  # [NBLK]
        if PREC == "fma":
            sc = tl.zeros([BM, NBLK], tl.float32)
            for d0 in range(0, BLOCK_D, DC):
                dd = d0 + tl.arange(0, DC)
                qc = tl.load(qrow[:, None] + dd[None, :], mask=(pos[:, None] < L) & (dd[None, :] < D),
                             other=0.0).to(tl.float32)  # [BM, DC]
                mc = tl.load(mrow[:, None] + dd[None, :], mask=(jj[:, None] < nc) & (dd[None, :] < D),
                             other=0.0)  # [NBLK, DC]
                sc += tl.sum(qc[:, None, :] * mc[None, :, :], 2)
        elif PREC == "bf16split":
            mp = mrow[:, None] + offs_d[None, :]
            mmask = (jj[:, None] < nc) & (offs_d[None, :] < D)
            sc = tl.dot(q, tl.trans(tl.load(mp + 2 * stride_mp, mask=mmask, other=0.0)))  # lo
            sc = tl.dot(q, tl.trans(tl.load(mp + stride_mp, mask=mmask, other=0.0)), sc)  # + mid
            sc = tl.dot(q, tl.trans(tl.load(mp, mask=mmask, other=0.0)), sc)  # + hi: [BM, NBLK] fp32, unscaled
        else:
            mt = tl.load(mrow[:, None] + offs_d[None, :], mask=(jj[:, None] < nc) & (offs_d[None, :] < D),
                         other=0.0)
            sc = tl.dot(q, tl.trans(mt), input_precision=PREC)  # [BM, NBLK] fp32, unscaled
        sc = tl.where(jj[None, :] < own[:, None], sc, float("-inf"))
        # Chunks arrive in increasing block index and argmax breaks ties to the left, so a
        # candidate only enters on a strictly larger score: the lower index wins ties.
        for _ in tl.static_range(KS):
            cmax = tl.max(sc, 1)
            carg = tl.argmax(sc, 1, tie_break_left=True)
            rmin = tl.min(topv, 1)
            # slot to evict: the lowest score, and among equal lowest the highest block index
            key = tl.where(topv == rmin[:, None], (topi + 1) * KSP + cols[None, :], -1)
            slot = tl.max(key, 1) % KSP
            hit = (cmax > rmin)[:, None] & (cols[None, :] == slot[:, None])
            topv = tl.where(hit, cmax[:, None], topv)
            topi = tl.where(hit, (j0 + carg)[:, None], topi)
            sc = tl.where(jj[None, :] == (j0 + carg)[:, None], float("-inf"), sc)
    if KEY:
        nseg = KS * NBT * tl.num_programs(2)
        out = tl.where(topv > float("-inf"), (h * NBT + b0 + topi) * KS + cols[None, :], nseg)
    else:
        out = tl.where(topv > float("-inf"), b0 + topi, -1)
    tl.store(SEL + rows[:, None] * stride_st + h * stride_sh + cols[None, :], out,
             mask=(pos[:, None] < L) & (cols[None, :] < KS))


# ----------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _plan(q, k, cu, max_seqlen, B, topk, cfg):
    """Block table, picks and the sorted entry list. Device work only (no host synchronisation),
    in a handful of launches: block table, block means, gate (writes the sort keys), sort, entries."""
    return _plan_picks(q, k, _plan_blocks(q, k, cu, max_seqlen, B, topk), cfg)


def _plan_blocks(q, k, cu, max_seqlen, B, topk):
    """The shapes and the block table of the packed batch (one launch): what the own-block passes
    need, and the start of the plan."""
    T, H, D = q.shape
    Hkv = k.shape[1]
    N = cu.numel() - 1
    KS = topk - 1
    dev = q.device
    cu = cu.to(device=dev, dtype=torch.int32)
    NBT = T // B + N  # upper bound on the number of blocks; unused ids get length 0
    blk_start = torch.empty(NBT, dtype=torch.int32, device=dev)
    blk_len = torch.empty(NBT, dtype=torch.int32, device=dev)
    blk_first = torch.empty(N, dtype=torch.int32, device=dev)
    _blocks_kernel[(_cdiv(NBT, 128),)](cu, blk_start, blk_len, blk_first, N, NBT, CHUNK=B, R=128, SP=32)
    return dict(T=T, H=H, Hkv=Hkv, D=D, N=N, KS=KS, B=B, NBT=NBT, max_seqlen=max_seqlen,
                cu=cu, blk_start=blk_start, blk_len=blk_len, blk_first=blk_first)


def _plan_picks(q, k, plan, cfg):
    """The rest of the plan, into ``plan``: gate (sort keys), sort, entries; returns the plan."""
    KS, H, NBT, dev = plan["KS"], plan["H"], plan["NBT"], q.device
    if KS == 0:
        return plan
    # sort key of every (token, head, slot) entry: segment (h * NBT + g) * KS + s, so the slots
    # of one (head, block) are adjacent and dK/dV reads them as one run; NSEG ("no pick") last
    key = _gate(q, k, plan, cfg, key=True).view(-1)  # [T*H*KS], t-major
    NSEG = KS * H * NBT
    skey, perm = torch.sort(key, stable=True)  # stable: tokens ascending inside a segment
    del key
    E = skey.numel()
    tok = torch.empty(E, dtype=torch.int32, device=dev)
    bounds = torch.empty(NSEG + 1, dtype=torch.int32, device=dev)
    R = 1024
    npe = _cdiv(E, R)
    _entries_kernel[(npe + _cdiv(NSEG + 1, R),)](perm, skey, tok, bounds, E, NSEG, H * KS, E.bit_length() + 1,
                                                  npe, R=R)
    plan.update(tok=tok, seg_bounds=bounds)  # segment i: entries [bounds[i], bounds[i+1])
    return plan


def _kv_descriptors(k, v, B, BN, on):
    """(desc_k, desc_v, True): TMA descriptors of K and V for the slot passes ([T, Hkv * D] views,
    [BN, D] tiles); or (k, v, False) when TMA is off or cannot apply. A slot pass streams a picked,
    so complete, block: a tile stays inside it when BN divides the chunk; D must be the tile width
    (a wider tile would read the next head's columns)."""
    T, Hkv, D = k.shape
    if not (on and B % BN == 0 and D == triton.next_power_of_2(D)):
        return k, v, False
    desc_k, desc_v = (TensorDescriptor.from_tensor(x.view(T, Hkv * D), [BN, D]) for x in (k, v))
    return desc_k, desc_v, True


def gate_precision(cfg, dtype: torch.dtype) -> str:
    """The gate variant that runs for inputs of ``dtype``: "bf16split" needs q exact in bf16, so
    other dtypes get "tf32x3" in its place."""
    prec = cfg["gate_prec"]
    return "tf32x3" if prec == "bf16split" and dtype != torch.bfloat16 else prec


def _gate(q, k, plan, cfg, key=False):
    """[T, H, KS] int32 picks of the Triton gate (global block ids, -1 = none), or with key the
    sort keys of the entries (see _gate_kernel)."""
    T, H, D = q.shape
    Hkv, KS, B, NBT = plan["Hkv"], plan["KS"], plan["B"], plan["NBT"]
    BLOCK_D = triton.next_power_of_2(D)
    prec = gate_precision(cfg, q.dtype)
    split = prec == "bf16split"
    # [NB, Hkv, D] fp32, or [NB, Hkv, 3, D] bf16 parts (hi, mid, lo)
    mean = torch.empty(NBT, Hkv, *((3, D) if split else (D,)), dtype=torch.bfloat16 if split else torch.float32,
                       device=q.device)
    stride_mp = mean.stride(2) if split else 0
    _block_mean_kernel[(NBT, Hkv)](k, mean, plan["blk_start"], plan["blk_len"], k.stride(0), k.stride(1),
                                   mean.stride(0), mean.stride(1), stride_mp, D, BLOCK_D=BLOCK_D, BR=32, SPLIT=split)
    sel = torch.empty(T, H, KS, dtype=torch.int32, device=q.device)
    return _launch_gate(q, mean, stride_mp, sel, plan["cu"], plan["blk_first"], None, plan["max_seqlen"], NBT, B, KS,
                        prec, key, cfg)


def _launch_gate(q, mean, stride_mp, sel, cu, blk_first, pos0, max_seqlen, NBT, B, KS, prec, key, cfg):
    """_gate_kernel over the runs of cu (pos0: their first positions, or None for sequence starts)."""
    T, H, D = q.shape
    _gate_kernel[(_cdiv(max_seqlen, cfg["gate_bm"]), cu.numel() - 1, H)](
        q, mean, sel, cu, blk_first, cu if pos0 is None else pos0, q.stride(0), q.stride(1), mean.stride(0),
        mean.stride(1), stride_mp, sel.stride(0), sel.stride(1), H // mean.shape[1], D, NBT, CHUNK=B, KS=KS,
        KSP=triton.next_power_of_2(KS), BLOCK_D=triton.next_power_of_2(D), BM=cfg["gate_bm"], NBLK=cfg["gate_nblk"],
        DC=cfg["gate_dc"], PREC=prec, KEY=key, HAS_POS0=pos0 is not None, num_warps=cfg["gate_warps"],
        num_stages=cfg.get("gate_stages", 3))  # 3: Triton's default, what configs without the key used
    return sel


def _tiles(plan, BM):
    """Tile schedule of the slot passes for a BM: pass s covers tiles [pass_lo[s], pass_lo[s+1]);
    tile_seg maps a tile to its segment, tile_first[seg] is the segment's first tile. Cached in
    the plan: the forward and the backward share it when their BM agree."""
    if ("tiles", BM) in plan:
        return plan[("tiles", BM)]
    KS, H, NBT, T = plan["KS"], plan["H"], plan["NBT"], plan["T"]
    dev = plan["tok"].device
    NSEG = KS * H * NBT
    UB = _cdiv(T * H, BM) + H * NBT  # tiles in one pass <= entries / BM + segments
    tile_first = torch.empty(NSEG, dtype=torch.int32, device=dev)
    pass_lo = torch.empty(KS + 1, dtype=torch.int32, device=dev)
    tile_seg = torch.empty(KS * UB, dtype=torch.int32, device=dev)
    _tile_prefix_kernel[(1,)](plan["seg_bounds"], tile_first, pass_lo, H * NBT, KS, BM=BM, R=1024)
    _tile_seg_kernel[(NSEG,)](plan["seg_bounds"], tile_first, tile_seg, BM=BM, R=128)
    t = dict(UB=UB, pass_lo=pass_lo, tile_seg=tile_seg, tile_first=tile_first)
    plan[("tiles", BM)] = t
    return t
