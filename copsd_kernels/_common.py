"""Shared pieces of the fused lm_head kernels: the GEMM mainloop that produces one logits tile,
the logit transform (logit_scale, softcap, temperature), launch-configuration heuristics and
the small host-side helpers every op uses."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting  # noqa: F401  (re-exported: the one switch, defined in __init__)


@triton.jit
def tanh_exp(x):
    # tanh through exp: the interpreter has no libdevice.  Saturates cleanly at +-1.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def logits_tile(x_ptr, w_ptr, rows, cols, N, V, H, stride_x, stride_w,
                logit_scale, softcap, inv_temp,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """z[BLOCK_N, BLOCK_V] = transform(x[rows] . w[cols]^T), fp32; padded columns are -inf.

    Returns (z, th) with th = tanh(logit_scale * x.w / softcap) (unused zeros when no softcap), which the
    backward needs for the chain rule.  Pointer offsets are int64 (N*H and V*H exceed 2^31).
    """
    offs_h = tl.arange(0, BLOCK_H)
    rmask = rows < N
    cmask = cols < V
    xp = x_ptr + rows.to(tl.int64)[:, None] * stride_x + offs_h[None, :]
    wp = w_ptr + cols.to(tl.int64)[None, :] * stride_w + offs_h[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hmask = (h0 + offs_h) < H
        x = tl.load(xp, mask=rmask[:, None] & hmask[None, :], other=0.0)
        w = tl.load(wp, mask=cmask[None, :] & hmask[:, None], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
        xp += BLOCK_H
        wp += BLOCK_H
    z, th = transform(acc, logit_scale, softcap, inv_temp, HAS_SOFTCAP)
    z = tl.where(cmask[None, :], z, float("-inf"))
    return z, th


@triton.jit
def transform(r, logit_scale, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """Raw logits r = x . w -> (final logits, th = tanh(logit_scale r / softcap); zeros without softcap,
    where the chain rule does not read it)."""
    z = r * logit_scale
    if HAS_SOFTCAP:
        th = tanh_exp(z / softcap)
        z = softcap * th
    else:
        th = z * 0.0
    return z * inv_temp, th


@triton.jit
def chain_rule(dz, th, logit_scale, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """d(final logits) -> d(x . w^T)."""
    dz = dz * inv_temp
    if HAS_SOFTCAP:
        dz = dz * (1.0 - th * th)
    return dz * logit_scale


@triton.jit
def tile_coords(N, V, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP: tl.constexpr):
    """This program's tile of the [N, V] logits, in grouped order: (rows, cols, vocabulary block, blocks)."""
    pid = tl.program_id(0)
    nb_n = tl.cdiv(N, BLOCK_N)
    nb_v = tl.cdiv(V, BLOCK_V)
    pid_n, pid_v = swizzle(pid, nb_n, nb_v, GROUP)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    return rows, cols, pid_v, nb_v


@triton.jit
def store_grad_tile(dz_ptr, stride_dz, rows, cols, dz, th, N, V, logit_scale, inv_temp,
                    HAS_SOFTCAP: tl.constexpr):
    """Apply the logit chain rule to a d(final logits) tile and store it (in dz_ptr's dtype)."""
    dz = chain_rule(dz, th, logit_scale, inv_temp, HAS_SOFTCAP)
    ptrs = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=(rows < N)[:, None] & (cols < V)[None, :])


@triton.jit
def swizzle(pid, n_row_blocks, n_col_blocks, GROUP: tl.constexpr):
    """Grouped ordering: programs running together share row blocks and weight tiles in L2."""
    width = GROUP * n_col_blocks
    group = pid // width
    first = group * GROUP
    size = tl.minimum(n_row_blocks - first, GROUP)
    pid_n = first + (pid % width) % size
    pid_v = (pid % width) // size
    return pid_n, pid_v


# ----------------------------------------------------------------------------- host helpers


def kernel_flags(hidden: torch.Tensor):
    """(UPCAST, IEEE) for tl.dot: the interpreter cannot dot bf16/fp16; fp32 inputs get exact
    fp32 products (no TF32) so fp32 callers see fp32 accuracy."""
    low = hidden.dtype in (torch.bfloat16, torch.float16)
    return (low and interpreting()), hidden.dtype == torch.float32


def tile_config(H: int, two_sided: bool = False, dtype=torch.bfloat16):
    """Block sizes for the tile-per-program kernels.

    H100 (sm_90): 128x128 output tiles with a 64-wide K step keep the tensor cores fed through
    Triton's wgmma path; the two-sided kernel holds two fp32 accumulators, so it uses 8 warps
    and fewer pipeline stages; fp32 inputs (exact fp32 FMA dots, 4-byte tiles) use a 32-wide K
    step so the pipeline fits in shared memory.  The interpreter gets tiny tiles (speed on CPU)."""
    if interpreting():
        return dict(BLOCK_N=16, BLOCK_V=16, BLOCK_H=16, num_warps=1, num_stages=1)
    bh = 64 if H >= 64 else max(16, triton.next_power_of_2(H))
    if dtype == torch.float32:
        return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=min(bh, 32), num_warps=8, num_stages=3)
    if two_sided:
        return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=bh, num_warps=8, num_stages=3)
    return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=bh, num_warps=8, num_stages=4)


def launch_kwargs(cfg):
    if interpreting():
        return {}
    return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def merge_lse(m: torch.Tensor, s: torch.Tensor, dim: int = 0):
    """Merge per-split (max, sum-exp) states along ``dim``; returns (M, S) with S relative to M."""
    M = m.max(dim=dim).values
    Ms = torch.where(torch.isinf(M), torch.zeros_like(M), M)
    S = (s * torch.exp(m - Ms.unsqueeze(dim))).sum(dim)
    return M, S
