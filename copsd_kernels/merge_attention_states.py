"""Triton kernel: merge two attention states by log-sum-exp (natural log, flash-attn layout).

``o [B, S, H, D]``, ``lse [B, H, S]``.  For one row,
``o = (e^{lse_a} o_a + e^{lse_b} o_b) / (e^{lse_a} + e^{lse_b})``, ``lse = logaddexp(lse_a, lse_b)``;
a row empty on both sides (both ``-inf``) becomes ``(0, -inf)`` instead of NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(
    o_a_ptr, lse_a_ptr, o_b_ptr, lse_b_ptr, o_ptr, lse_ptr,
    n_rows, S, H, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # row = (b * S + s) * H + h, o's order
    rmask = rows < n_rows
    h = rows % H
    bs = rows // H
    s = bs % S
    b = bs // S
    lse_off = (b.to(tl.int64) * H + h) * S + s
    la = tl.load(lse_a_ptr + lse_off, mask=rmask, other=float("-inf")).to(tl.float32)
    lb = tl.load(lse_b_ptr + lse_off, mask=rmask, other=float("-inf")).to(tl.float32)
    m = tl.maximum(la, lb)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    wa = tl.exp(la - m_safe)
    wb = tl.exp(lb - m_safe)
    tot = wa + wb
    nonempty = tot > 0.0
    lse = tl.where(nonempty, m_safe + tl.log(tl.where(nonempty, tot, 1.0)), float("-inf"))
    inv = tl.where(nonempty, 1.0 / tl.where(nonempty, tot, 1.0), 0.0)
    wa = wa * inv
    wb = wb * inv

    d = tl.arange(0, BLOCK_D)
    off = rows.to(tl.int64)[:, None] * D + d[None, :]
    mask = rmask[:, None] & (d < D)[None, :]
    oa = tl.load(o_a_ptr + off, mask=mask, other=0.0).to(tl.float32)
    ob = tl.load(o_b_ptr + off, mask=mask, other=0.0).to(tl.float32)
    o = oa * wa[:, None] + ob * wb[:, None]
    tl.store(o_ptr + off, o.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + lse_off, lse, mask=rmask)


def merge_attention_states(o_a, lse_a, o_b, lse_b, *, out_dtype=None):
    """Launch the merge.  Inputs contiguous; returns ``(o in out_dtype or o_a.dtype, lse float32)``."""
    b, s, h, d = o_a.shape
    o = torch.empty(o_a.shape, dtype=out_dtype or o_a.dtype, device=o_a.device)
    lse = torch.empty((b, h, s), dtype=torch.float32, device=o_a.device)
    n_rows = b * s * h
    if n_rows == 0:
        return o, lse
    block_d = max(16, triton.next_power_of_2(d))
    block_r = max(1, min(128, 4096 // block_d))
    grid = (triton.cdiv(n_rows, block_r),)
    _merge_kernel[grid](o_a, lse_a, o_b, lse_b, o, lse, n_rows, s, h, d,
                        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return o, lse
