"""Fused lm_head top-k: running top-k per vocabulary split, plus the row LSE.

Program (row block, split) walks the split's vocabulary tiles.  Each logit is packed with its
column into one order-preserving int64 key (high word: the float bits mapped to signed-int
order; low word: 2^31-1-col, so ties prefer the lower id).  The running candidate buffer
[BLOCK_N, KB] stays sorted descending; a tile's two column halves are each sorted ascending and
merged with ``max(buffer, half)`` (the bitonic-merge identity: the elementwise max of a
descending and an ascending sorted list holds the KB largest of their union) and re-sorted.
A half is skipped when none of its rows beats its row's current KB-th best (the threshold).
Per-split candidates ([N, splits, k]) are merged by ``torch.ops.copsd_cuda.topk_merge`` or
``torch.topk``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import logits_tile


@triton.jit
def _pack(z, cols):
    bits = z.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (key.to(tl.int64) << 32) + (0x7FFFFFFF - cols.to(tl.int64))[None, :]


@triton.jit
def _unpack(key):
    hi = (key >> 32).to(tl.int32)
    bits = tl.where(hi < 0, hi ^ 0x7FFFFFFF, hi)
    val = bits.to(tl.float32, bitcast=True)
    col = 0x7FFFFFFF - (key - ((key >> 32) << 32))
    return val, col


@triton.jit
def _merge(buf, half):
    # buf sorted descending; bring in the KB best of `half` only if some row can gain.
    thr = tl.min(buf, 1)
    if tl.max((tl.max(half, 1) > thr).to(tl.int32), 0) > 0:
        asc = tl.sort(half, 1)
        buf = tl.sort(tl.maximum(buf, asc), 1, descending=True)
    return buf


@triton.jit
def topk_split_kernel(x_ptr, w_ptr, val_ptr, col_ptr, state_ptr,
                      N, V, H, K, SPLITS, tiles_per_split, stride_x, stride_w,
                      logit_scale, softcap, inv_temp,
                      BLOCK_N: tl.constexpr, KB: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                      HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """val/col: [N, SPLITS, K] candidates (descending per split); state: [2, SPLITS, N] (max, sumexp).
    BLOCK_V must be 2 * KB (a tile is merged as two halves of KB columns)."""
    pid = tl.program_id(0)
    split = pid % SPLITS
    pid_n = pid // SPLITS
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    buf = tl.full((BLOCK_N, KB), -9187343244130779136, tl.int64)  # key of (-inf, col 2^31-1)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t0 = split * tiles_per_split
    for t in range(t0, t0 + tiles_per_split):
        if t * BLOCK_V < V:
            cols = t * BLOCK_V + tl.arange(0, BLOCK_V)
            z, th = logits_tile(x_ptr, w_ptr, rows, cols, N, V, H, stride_x, stride_w,
                                logit_scale, softcap, inv_temp, BLOCK_N, BLOCK_V, BLOCK_H,
                                HAS_SOFTCAP, UPCAST, IEEE)
            m_new = tl.maximum(m, tl.max(z, 1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
            m = m_new
            keys = _pack(z, cols)
            lo, hi = tl.split(tl.reshape(keys, (BLOCK_N, KB, 2)))
            buf = _merge(buf, lo)
            buf = _merge(buf, hi)
    out = state_ptr + tl.cast(split, tl.int64) * N + rows
    tl.store(out, m, mask=rmask)
    tl.store(out + tl.cast(SPLITS, tl.int64) * N, s, mask=rmask)
    val, col = _unpack(buf)
    kk = tl.arange(0, KB)
    off = (rows.to(tl.int64)[:, None] * SPLITS + split) * K + kk[None, :]
    omask = rmask[:, None] & (kk[None, :] < K)
    tl.store(val_ptr + off, val, mask=omask)
    tl.store(col_ptr + off, col, mask=omask)
