"""Fused lm_head log-probs + entropy: per-tile mergeable row statistics (forward) and the
recomputed gradient tile (backward).

Forward: every program computes one [BLOCK_N tokens x BLOCK_V vocab] logits tile with a GEMM
mainloop over H and reduces it to per-row partial states (max, sum-exp, entropy accumulator,
optionally the sum-exp of the tile with given ids removed = the top-k tail); the gathered logit
at ``ids`` is written by the one tile that holds it.  States of the V/BLOCK_V tiles of a row are
merged on the host (a few small [tiles, N] ops).

Backward: the same tile is recomputed and turned into d(x.w^T) for

    dz_j = -q_j (a_n + b_n ls_j) + [j not in K] t_n exp(ls_j - u_n) + [j == id_n] c_n

which covers the log-prob/entropy/LSE gradient and the dense part of the top-k-support
divergence gradient.  Tiles go to a bounded [chunk, V] workspace; dX and dW come from two GEMMs
on it (see ``copsd.backends._triton_common``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import logits_tile, store_grad_tile, tile_coords

GROUP = tl.constexpr(8)  # row blocks per swizzle group


@triton.jit
def _in_set(rows, cols, N, k_ptr, K, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """[BLOCK_N, BLOCK_V] mask: column id is one of the row's K ids (k_ptr is [N, K] int64)."""
    rmask = rows < N
    hit = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.int1)
    base = k_ptr + rows.to(tl.int64) * K
    for kk in range(0, K):
        kid = tl.load(base + kk, mask=rmask, other=-1)
        hit = hit | (cols.to(tl.int64)[None, :] == kid[:, None])
    return hit


@triton.jit
def row_stats_kernel(x_ptr, w_ptr, ids_ptr, k_ptr, state_ptr, zid_ptr,
                     N, V, H, K, stride_x, stride_w, logit_scale, softcap, inv_temp,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                     ENTROPY: tl.constexpr, GATHER: tl.constexpr, EXCLUDE: tl.constexpr):
    """state_ptr: [NSTATE, n_vblocks, N] fp32 = (max, sumexp[, entropy acc][, tail max, tail sumexp])."""
    rows, cols, pid_v, nb_v = tile_coords(N, V, BLOCK_N, BLOCK_V, GROUP)
    rmask = rows < N
    z, th = logits_tile(x_ptr, w_ptr, rows, cols, N, V, H, stride_x, stride_w,
                        logit_scale, softcap, inv_temp, BLOCK_N, BLOCK_V, BLOCK_H,
                        HAS_SOFTCAP, UPCAST, IEEE)
    plane = tl.cast(nb_v, tl.int64) * N
    out = state_ptr + tl.cast(pid_v, tl.int64) * N + rows
    m = tl.max(z, 1)
    ms = tl.where(m == float("-inf"), 0.0, m)
    d = z - ms[:, None]
    e = tl.exp(d)
    tl.store(out, m, mask=rmask)
    tl.store(out + plane, tl.sum(e, 1), mask=rmask)
    tail_out = out + 2 * plane
    if ENTROPY:
        # sum e^{z-m} (z-m): relative to the tile max, so H = log S - W/S does not cancel.
        tl.store(out + 2 * plane, tl.sum(tl.where(z > float("-inf"), e * d, 0.0), 1), mask=rmask)
        tail_out = out + 3 * plane
    if EXCLUDE:
        zt = tl.where(_in_set(rows, cols, N, k_ptr, K, BLOCK_N, BLOCK_V), float("-inf"), z)
        mt = tl.max(zt, 1)
        mts = tl.where(mt == float("-inf"), 0.0, mt)
        tl.store(tail_out, mt, mask=rmask)
        tl.store(tail_out + plane, tl.sum(tl.exp(zt - mts[:, None]), 1), mask=rmask)
    if GATHER:
        ids = tl.load(ids_ptr + rows, mask=rmask, other=-1)
        col0 = pid_v * BLOCK_V
        inside = rmask & (ids >= col0) & (ids < col0 + BLOCK_V)
        zid = tl.sum(tl.where(cols.to(tl.int64)[None, :] == ids[:, None], z, 0.0), 1)
        tl.store(zid_ptr + rows, zid, mask=inside)


@triton.jit
def dense_grad_kernel(x_ptr, w_ptr, lse_ptr, a_ptr, b_ptr, t_ptr, u_ptr, ids_ptr, c_ptr, k_ptr,
                      dz_ptr, N, V, H, K, col0, stride_x, stride_w, stride_dz,
                      logit_scale, softcap, inv_temp,
                      BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                      HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                      HAS_B: tl.constexpr, HAS_TAIL: tl.constexpr, GATHER: tl.constexpr):
    """dz[N, V] of the dense gradient form in the module doc for the vocabulary slice
    [col0, col0 + V) (w_ptr points at its first row; ids and K hold global ids)."""
    rows, cols, _, _ = tile_coords(N, V, BLOCK_N, BLOCK_V, GROUP)
    rmask = rows < N
    cmask = cols < V
    z, th = logits_tile(x_ptr, w_ptr, rows, cols, N, V, H, stride_x, stride_w,
                        logit_scale, softcap, inv_temp, BLOCK_N, BLOCK_V, BLOCK_H,
                        HAS_SOFTCAP, UPCAST, IEEE)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    ls = tl.where(cmask[None, :], z - lse[:, None], 0.0)
    q = tl.where(cmask[None, :], tl.exp(ls), 0.0)
    a = tl.load(a_ptr + rows, mask=rmask, other=0.0)
    if HAS_B:
        b = tl.load(b_ptr + rows, mask=rmask, other=0.0)
        dz = -q * (a[:, None] + b[:, None] * ls)
    else:
        dz = -q * a[:, None]
    if HAS_TAIL:
        t = tl.load(t_ptr + rows, mask=rmask, other=0.0)
        u = tl.load(u_ptr + rows, mask=rmask, other=0.0)
        off = t[:, None] * tl.exp(tl.minimum(ls - u[:, None], 0.0))
        hit = _in_set(rows, col0 + cols, N, k_ptr, K, BLOCK_N, BLOCK_V)
        keep = cmask[None, :] & (hit.to(tl.int32) == 0)
        dz += tl.where(keep, off, 0.0)
    if GATHER:
        ids = tl.load(ids_ptr + rows, mask=rmask, other=-1)
        c = tl.load(c_ptr + rows, mask=rmask, other=0.0)
        dz += tl.where((col0 + cols).to(tl.int64)[None, :] == ids[:, None], c[:, None], 0.0)
    store_grad_tile(dz_ptr, stride_dz, rows, cols, dz, th, N, V, logit_scale, inv_temp, HAS_SOFTCAP)


def grid_tiles(N, V, cfg):
    return (triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(V, cfg["BLOCK_V"]),)
