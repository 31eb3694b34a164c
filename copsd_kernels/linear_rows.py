"""Row kernels of the chunked lm_head path ("chunked cuBLAS + fused row kernel").

The host computes a chunk of raw logits ``r = x . w^T`` with cuBLAS into an fp32 ``[T, V]`` buffer
(bf16/fp16 operands, fp32 output) and launches ONE program per row here.  A program walks its row
over V in blocks of ``BLOCK`` columns, keeps per-lane online (max, sum-exp) states and reduces them
at the end of a pass, so a row costs a few streaming reads of its logits and no ``[T, V]``
temporaries.  The logit transform (``logit_scale``, ``softcap``, ``temperature``) is applied on
the fly and its chain rule folded into the written gradient, which is stored in the input dtype
into a separate ``[T, V]`` buffer that feeds the dX / dW GEMMs.

* ``div_row_kernel``: student + teacher rows -> per-token divergence (pass 1: both LSEs; pass 2:
  sum of the clipped summand s' and of g' = ds'/dls) and, with ``GRAD``, pass 3:
  dz_j = tg (g'_j - q_j G) with G = sum g'  (summands in ``linear_divergence._summand``; the
  unclipped KLs use the exact G = KL + 1 / -1).
* ``lp_row_kernel``: LSE, entropy (-sum q ls) and the logit at ``ids`` (``GATHER``).
* ``lp_grad_row_kernel``: dz_j = -q_j (a + b ls_j) + [j == id] c  (the log-prob/entropy/LSE
  gradient, same form as ``linear_logprobs.dense_grad_kernel``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import chain_rule as _chain
from ._common import transform as _transform
from .linear_divergence import _summand


@triton.jit
def _load_logits(row_ptr, v0, offs, V, logit_scale, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """Block [v0, v0 + BLOCK) of a raw fp32 logits row, transformed: (in-range mask, logits, tanh factor)."""
    cm = (v0 + offs) < V
    z, th = _transform(tl.load(row_ptr + v0 + offs, mask=cm, other=0.0).to(tl.float32),
                       logit_scale, softcap, inv_temp, HAS_SOFTCAP)
    return cm, z, th


@triton.jit
def _pair_block(zs_row, zt_row, v0, offs, V, lse_s, lse_t, logit_scale, softcap, inv_temp,
                HAS_SOFTCAP: tl.constexpr):
    """Student / teacher log-probs of one block of a row pair (0 out of range) and the student's tanh factor."""
    cm, zs, th = _load_logits(zs_row, v0, offs, V, logit_scale, softcap, inv_temp, HAS_SOFTCAP)
    _, zt, _ = _load_logits(zt_row, v0, offs, V, logit_scale, softcap, inv_temp, HAS_SOFTCAP)
    return cm, tl.where(cm, zs - lse_s, 0.0), tl.where(cm, zt - lse_t, 0.0), th


@triton.jit
def _row_lse(ptr, V, logit_scale, softcap, inv_temp, BLOCK: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Natural-log LSE of one transformed row (per-lane online max/sum-exp, reduced at the end)."""
    offs = tl.arange(0, BLOCK)
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    for v0 in range(0, V, BLOCK):
        cm, z, _ = _load_logits(ptr, v0, offs, V, logit_scale, softcap, inv_temp, HAS_SOFTCAP)
        z = tl.where(cm, z, float("-inf"))
        m_new = tl.maximum(m, z)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.exp(z - m_safe)
        m = m_new
    M = tl.max(m, 0)
    M_safe = tl.where(M == float("-inf"), 0.0, M)
    S = tl.sum(s * tl.exp(m - M_safe), 0)
    return M_safe + tl.log(S)


@triton.jit
def div_row_kernel(zs_ptr, zt_ptr, loss_ptr, tg_ptr, dz_ptr, V, stride_zs, stride_zt, stride_dz,
                   logit_scale, softcap, inv_temp, beta, log_beta, log_1mb, clip,
                   BLOCK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, KIND: tl.constexpr,
                   CLIP: tl.constexpr, GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * stride_zs
    zt_row = zt_ptr + row * stride_zt
    lse_s = _row_lse(zs_row, V, logit_scale, softcap, inv_temp, BLOCK, HAS_SOFTCAP)
    lse_t = _row_lse(zt_row, V, logit_scale, softcap, inv_temp, BLOCK, HAS_SOFTCAP)
    offs = tl.arange(0, BLOCK)
    acc_s = tl.zeros((BLOCK,), tl.float32)
    acc_g = tl.zeros((BLOCK,), tl.float32)
    for v0 in range(0, V, BLOCK):
        cm, ls, lt, _ = _pair_block(zs_row, zt_row, v0, offs, V, lse_s, lse_t, logit_scale, softcap, inv_temp,
                                    HAS_SOFTCAP)
        s, g = _summand(ls, lt, beta, log_beta, log_1mb, clip, KIND, CLIP)
        acc_s += tl.where(cm, s, 0.0)
        acc_g += tl.where(cm, g, 0.0)
    loss = tl.sum(acc_s, 0)
    tl.store(loss_ptr + row, loss)
    if GRAD:
        # sum q = sum p = 1 exactly in the unclipped KLs: G = KL + 1 (reverse), -1 (forward), so
        # identical student and teacher give exactly zero gradient (no rounding of the sums).
        if CLIP:
            G = tl.sum(acc_g, 0)
        elif KIND == 0:
            G = loss + 1.0
        elif KIND == 1:
            G = -1.0
        else:
            G = tl.sum(acc_g, 0)
        tg = tl.load(tg_ptr + row)
        dz_row = dz_ptr + row * stride_dz
        for v0 in range(0, V, BLOCK):
            cm, ls, lt, th = _pair_block(zs_row, zt_row, v0, offs, V, lse_s, lse_t, logit_scale, softcap,
                                         inv_temp, HAS_SOFTCAP)
            _, g = _summand(ls, lt, beta, log_beta, log_1mb, clip, KIND, CLIP)
            dz = tg * (g - tl.exp(ls) * G)
            dz = _chain(tl.where(cm, dz, 0.0), th, logit_scale, inv_temp, HAS_SOFTCAP)
            tl.store(dz_row + v0 + offs, dz.to(dz_ptr.dtype.element_ty), mask=cm)


@triton.jit
def lp_row_kernel(z_ptr, ids_ptr, lse_ptr, ent_ptr, zid_ptr, V, stride_z,
                  logit_scale, softcap, inv_temp,
                  BLOCK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr,
                  GATHER: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    lse = _row_lse(z_row, V, logit_scale, softcap, inv_temp, BLOCK, HAS_SOFTCAP)
    tl.store(lse_ptr + row, lse)
    if ENTROPY:
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), tl.float32)
        for v0 in range(0, V, BLOCK):
            cm, z, _ = _load_logits(z_row, v0, offs, V, logit_scale, softcap, inv_temp, HAS_SOFTCAP)
            ls = tl.where(cm, z - lse, 0.0)
            acc += tl.where(cm, tl.exp(ls) * ls, 0.0)
        tl.store(ent_ptr + row, -tl.sum(acc, 0))
    if GATHER:
        idx = tl.load(ids_ptr + row)
        zid, _ = _transform(tl.load(z_row + idx).to(tl.float32), logit_scale, softcap, inv_temp, HAS_SOFTCAP)
        tl.store(zid_ptr + row, zid)


@triton.jit
def lp_grad_row_kernel(z_ptr, ids_ptr, lse_ptr, a_ptr, b_ptr, c_ptr, dz_ptr, V, stride_z, stride_dz,
                       logit_scale, softcap, inv_temp,
                       BLOCK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_B: tl.constexpr,
                       GATHER: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    dz_row = dz_ptr + row * stride_dz
    lse = tl.load(lse_ptr + row)
    a = tl.load(a_ptr + row)
    if HAS_B:
        b = tl.load(b_ptr + row)
    if GATHER:
        idx = tl.load(ids_ptr + row)
        c = tl.load(c_ptr + row)
    offs = tl.arange(0, BLOCK)
    for v0 in range(0, V, BLOCK):
        cols = v0 + offs
        cm = cols < V
        z, th = _transform(tl.load(z_row + cols, mask=cm, other=0.0).to(tl.float32),
                           logit_scale, softcap, inv_temp, HAS_SOFTCAP)
        ls = tl.where(cm, z - lse, 0.0)
        q = tl.where(cm, tl.exp(ls), 0.0)
        if HAS_B:
            dz = -q * (a + b * ls)
        else:
            dz = -q * a
        if GATHER:
            dz += tl.where(cols.to(tl.int64) == idx, c, 0.0)
        dz = _chain(dz, th, logit_scale, inv_temp, HAS_SOFTCAP)
        tl.store(dz_row + cols, dz.to(dz_ptr.dtype.element_ty), mask=cm)
