"""Fused full-vocabulary divergence between a student and a teacher lm_head.

Each program computes the student tile AND the teacher tile of the same [BLOCK_N x BLOCK_V]
block (two GEMM mainloops, over H and over the teacher's hidden size HT); neither leaves the chip.

* ``pair_stats_kernel`` (pass 1): per-tile (max, sum-exp) of both sides plus the one-pass
  accumulators A = sum e^{zs-ms} d and B = -sum e^{zt-mt} d with d = (zs - ms) - (zt - mt), i.e.
  relative to the maxes so that logits of 1e4 scale do not cancel; after the host merge (which
  shifts every tile to the row maxes)  KL(q||p) = A/Ss - log Ss + log St  and
  KL(p||q) = B/St - log St + log Ss.
* ``pair_sum_kernel`` (pass 2, only for jsd or term_clip, which have no one-pass form): with the
  row LSEs known, per-tile sums of the clipped summand s' and of g' = ds'/dls.
* ``pair_grad_kernel`` (backward): recomputes both tiles and writes
  dz_j = tg_n (g'_j - q_j G_n) through the logit chain rule into a [chunk, V] workspace.

Summands (ls, lt = student/teacher log-softmax):
  reverse_kl s = q (ls - lt), g = q (ls - lt + 1);  forward_kl s = p (lt - ls), g = -p;
  jsd(beta)  m = (1-beta) q + beta p, s = beta p (lt - lm) + (1-beta) q (ls - lm), g = (1-beta) q (ls - lm).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import logits_tile, store_grad_tile, tile_coords

GROUP = tl.constexpr(8)  # row blocks per swizzle group
REVERSE_KL, FORWARD_KL, JSD = 0, 1, 2


@triton.jit
def _summand(ls, lt, beta, log_beta, log_1mb, clip, KIND: tl.constexpr, CLIP: tl.constexpr):
    if KIND == 0:
        q = tl.exp(ls)
        d = ls - lt
        s = q * d
        g = q * (d + 1.0)
    elif KIND == 1:
        p = tl.exp(lt)
        s = p * (lt - ls)
        g = -p
    else:
        a = ls + log_1mb
        b = lt + log_beta
        mx = tl.maximum(a, b)
        lm = mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))
        q = tl.exp(ls)
        p = tl.exp(lt)
        g = (1.0 - beta) * q * (ls - lm)
        s = beta * p * (lt - lm) + g
    if CLIP:
        keep = s <= clip
        s = tl.where(keep, s, clip)
        g = tl.where(keep, g, 0.0)
    return s, g


@triton.jit
def _pair_program(xs_ptr, ws_ptr, xt_ptr, wt_ptr, N, V, H, HT, sxs, sws, sxt, swt,
                  logit_scale, softcap, inv_temp,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """This program's tile: rows, columns, their masks, its vocabulary block and the number of blocks, then the
    student and teacher logits tiles (and the student's tanh factor for the chain rule)."""
    rows, cols, pid_v, nb_v = tile_coords(N, V, BLOCK_N, BLOCK_V, GROUP)
    rmask = rows < N
    cmask = cols < V
    zs, th = logits_tile(xs_ptr, ws_ptr, rows, cols, N, V, H, sxs, sws, logit_scale, softcap,
                         inv_temp, BLOCK_N, BLOCK_V, BLOCK_H, HAS_SOFTCAP, UPCAST, IEEE)
    zt, _ = logits_tile(xt_ptr, wt_ptr, rows, cols, N, V, HT, sxt, swt, logit_scale, softcap,
                        inv_temp, BLOCK_N, BLOCK_V, BLOCK_H, HAS_SOFTCAP, UPCAST, IEEE)
    return rows, cols, rmask, cmask, pid_v, nb_v, zs, zt, th


@triton.jit
def _pair_logprobs(zs, zt, lse_s, lse_t, cmask):
    """Student / teacher log-probs of the tile from the rows' LSEs (0 in padded columns)."""
    ls = tl.where(cmask[None, :], zs - lse_s[:, None], 0.0)
    lt = tl.where(cmask[None, :], zt - lse_t[:, None], 0.0)
    return ls, lt


@triton.jit
def pair_stats_kernel(xs_ptr, ws_ptr, xt_ptr, wt_ptr, state_ptr,
                      N, V, H, HT, sxs, sws, sxt, swt, logit_scale, softcap, inv_temp,
                      BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                      HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """state_ptr: [6, n_vblocks, N] fp32 = (ms, Ss, mt, St, A, B)."""
    rows, cols, rmask, cmask, pid_v, nb_v, zs, zt, th = _pair_program(
        xs_ptr, ws_ptr, xt_ptr, wt_ptr, N, V, H, HT, sxs, sws, sxt, swt, logit_scale, softcap, inv_temp,
        BLOCK_N, BLOCK_V, BLOCK_H, HAS_SOFTCAP, UPCAST, IEEE)
    ms = tl.max(zs, 1)
    mt = tl.max(zt, 1)
    es = tl.exp(zs - ms[:, None])
    et = tl.exp(zt - mt[:, None])
    diff = tl.where(cmask[None, :], (zs - ms[:, None]) - (zt - mt[:, None]), 0.0)
    plane = tl.cast(nb_v, tl.int64) * N
    out = state_ptr + tl.cast(pid_v, tl.int64) * N + rows
    tl.store(out, ms, mask=rmask)
    tl.store(out + plane, tl.sum(es, 1), mask=rmask)
    tl.store(out + 2 * plane, mt, mask=rmask)
    tl.store(out + 3 * plane, tl.sum(et, 1), mask=rmask)
    tl.store(out + 4 * plane, tl.sum(es * diff, 1), mask=rmask)
    tl.store(out + 5 * plane, -tl.sum(et * diff, 1), mask=rmask)


@triton.jit
def pair_sum_kernel(xs_ptr, ws_ptr, xt_ptr, wt_ptr, lse_s_ptr, lse_t_ptr, out_ptr,
                    N, V, H, HT, sxs, sws, sxt, swt, logit_scale, softcap, inv_temp,
                    beta, log_beta, log_1mb, clip,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                    KIND: tl.constexpr, CLIP: tl.constexpr):
    """out_ptr: [2, n_vblocks, N] fp32 = per-tile (sum s', sum g')."""
    rows, cols, rmask, cmask, pid_v, nb_v, zs, zt, th = _pair_program(
        xs_ptr, ws_ptr, xt_ptr, wt_ptr, N, V, H, HT, sxs, sws, sxt, swt, logit_scale, softcap, inv_temp,
        BLOCK_N, BLOCK_V, BLOCK_H, HAS_SOFTCAP, UPCAST, IEEE)
    lse_s = tl.load(lse_s_ptr + rows, mask=rmask, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=rmask, other=0.0)
    ls, lt = _pair_logprobs(zs, zt, lse_s, lse_t, cmask)
    s, g = _summand(ls, lt, beta, log_beta, log_1mb, clip, KIND, CLIP)
    s = tl.where(cmask[None, :], s, 0.0)
    g = tl.where(cmask[None, :], g, 0.0)
    plane = tl.cast(nb_v, tl.int64) * N
    out = out_ptr + tl.cast(pid_v, tl.int64) * N + rows
    tl.store(out, tl.sum(s, 1), mask=rmask)
    tl.store(out + plane, tl.sum(g, 1), mask=rmask)


@triton.jit
def pair_grad_kernel(xs_ptr, ws_ptr, xt_ptr, wt_ptr, lse_s_ptr, lse_t_ptr, G_ptr, tg_ptr, dz_ptr,
                     N, V, H, HT, sxs, sws, sxt, swt, stride_dz, logit_scale, softcap, inv_temp,
                     beta, log_beta, log_1mb, clip,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                     KIND: tl.constexpr, CLIP: tl.constexpr):
    rows, cols, rmask, cmask, pid_v, nb_v, zs, zt, th = _pair_program(
        xs_ptr, ws_ptr, xt_ptr, wt_ptr, N, V, H, HT, sxs, sws, sxt, swt, logit_scale, softcap, inv_temp,
        BLOCK_N, BLOCK_V, BLOCK_H, HAS_SOFTCAP, UPCAST, IEEE)
    lse_s = tl.load(lse_s_ptr + rows, mask=rmask, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=rmask, other=0.0)
    G = tl.load(G_ptr + rows, mask=rmask, other=0.0)
    tg = tl.load(tg_ptr + rows, mask=rmask, other=0.0)
    ls, lt = _pair_logprobs(zs, zt, lse_s, lse_t, cmask)
    _, g = _summand(ls, lt, beta, log_beta, log_1mb, clip, KIND, CLIP)
    dz = tg[:, None] * (g - tl.exp(ls) * G[:, None])
    dz = tl.where(cmask[None, :], dz, 0.0)
    store_grad_tile(dz_ptr, stride_dz, rows, cols, dz, th, N, V, logit_scale, inv_temp, HAS_SOFTCAP)
