"""Triton host code of ``linear_topk``: the kernel-level ``topk`` of ``copsd.backends``.

Fused path: ``copsd_kernels.linear_topk.topk_split_kernel`` keeps a running top-k per vocabulary split, and
the splits' candidates are merged by the CUDA ``topk_merge`` op (``copsd.backends._cuda_topk``) where
``copsd._cuda`` is built, ``torch.topk`` otherwise.  Chunked path (and k > 256 on either path):
token-chunked cuBLAS logits + ``torch.topk`` + the row kernel's LSE.  ``path`` is "fused" or "chunked".
"""

from __future__ import annotations

import torch
import triton

from copsd.backends import _triton_common as C
from copsd.backends.reference import transform
from copsd_kernels import _common as kc
from copsd_kernels import linear_topk as ktop


def topk(hidden, weight, k, logit, path=None):
    path = C.check_path(path)
    weight = C.like(weight, hidden)
    N = hidden.shape[0]
    dev = hidden.device
    if N == 0:
        return (torch.empty(0, k, dtype=torch.int64, device=dev),
                torch.empty(0, k, dtype=torch.float32, device=dev),
                torch.empty(0, dtype=torch.float32, device=dev))
    KB = max(16, triton.next_power_of_2(k))
    if KB > 256 or path == "chunked":
        return _topk_chunked(hidden, weight, k, logit)
    return _topk_fused(hidden, weight, k, logit, KB)


def _merge_candidates(vals, cols, k):
    """Top k (descending) of each row of [N, M] candidates."""
    if vals.shape[1] == k:
        return vals, cols
    if vals.is_cuda:
        from copsd.backends import _cuda_topk

        if _cuda_topk.usable(vals.shape[1]):
            return _cuda_topk.topk_merge(vals, cols, k)
    v, sel = vals.topk(k, dim=1)
    return v, cols.gather(1, sel)


def _topk_fused(hidden, weight, k, logit, KB):
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    if C.interpreting():
        BN, BH, launch = 16, 16, {}
    else:
        BN = 64 if KB <= 64 else 32
        BH = 64 if H >= 64 else max(16, triton.next_power_of_2(H))
        if hidden.dtype == torch.float32:
            BH = min(BH, 32)
        launch = dict(num_warps=8, num_stages=3)
    n_tiles = triton.cdiv(V, 2 * KB)
    n_rb = triton.cdiv(N, BN)
    splits = min(n_tiles, max(1, triton.cdiv(4 * C.num_sms(dev), n_rb)), max(1, 4096 // k))
    per = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, per)
    vals = torch.empty(N, splits, k, dtype=torch.float32, device=dev)
    cols = torch.empty(N, splits, k, dtype=torch.int64, device=dev)
    state = torch.empty(2, splits, N, dtype=torch.float32, device=dev)
    (scale, cap, inv_t), has_cap = C.logit_args(logit)
    upcast, ieee = kc.kernel_flags(hidden)
    ktop.topk_split_kernel[(n_rb * splits,)](
        hidden, weight, vals, cols, state, N, V, H, k, splits, per,
        hidden.stride(0), weight.stride(0), scale, cap, inv_t,
        BLOCK_N=BN, KB=KB, BLOCK_V=2 * KB, BLOCK_H=BH, HAS_SOFTCAP=has_cap, UPCAST=upcast, IEEE=ieee,
        **launch)
    M, S = kc.merge_lse(state[0], state[1])
    lse = M + torch.log(S)
    v, i = _merge_candidates(vals.view(N, splits * k), cols.view(N, splits * k), k)
    return i, v - lse[:, None], lse


def _topk_chunked(hidden, weight, k, logit):
    """Token-chunked cuBLAS logits (fp32 output) + torch.topk + the row kernel's LSE.  The logit
    transform is increasing (positive scale, temperature, softcap), so the top k of the raw logits
    are the top k of the final ones."""
    N = hidden.shape[0]
    dev = hidden.device
    ids = torch.empty(N, k, dtype=torch.int64, device=dev)
    lp = torch.empty(N, k, dtype=torch.float32, device=dev)
    lse = torch.empty(N, dtype=torch.float32, device=dev)
    for n0, n1, zc in C.row_stat_chunks(hidden, weight, logit, lse):
        v, i = zc.topk(k, dim=1)
        ids[n0:n1] = i
        lp[n0:n1] = transform(v, logit)[0] - lse[n0:n1, None]
    return ids, lp, lse
