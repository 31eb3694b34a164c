"""CUDA backend's ``linear_topk`` (kernel-level ``topk`` of ``copsd.backends``) and the checked entry to the
``topk_merge`` op of ``csrc/cuda/topk_merge.cu`` (``torch.ops.copsd_cuda.topk_merge``), which the Triton
backend also uses to merge its per-split candidates.

``topk``: per token chunk the logits GEMM (fp32 output), the logit transform and LSE in torch
(``reference.transform``), ``torch.topk`` per vocabulary split, and ``topk_merge`` to merge the splits'
candidates (``torch.topk`` on CPU tensors, where the op does not run: tests only).
"""

from __future__ import annotations

import importlib.util

import torch

from copsd.backends.reference import transform

TOPK_MERGE_MAX = 16384  # candidates per row the CUDA op handles (one block per row, shared memory)
CHUNK_BYTES = 256 << 20  # fp32 logits of one token chunk in ``topk``
SPLITS = 8  # vocabulary splits of ``topk``: candidates per row = SPLITS * k


def built():
    return importlib.util.find_spec("copsd._cuda") is not None


def usable(candidates):
    """Whether ``topk_merge`` can merge ``candidates`` per row here (extension built, within its limit)."""
    return candidates <= TOPK_MERGE_MAX and built()


def topk_merge(vals, ids, k):
    """The k best (value descending, smaller id first on ties) of each row of [rows, M] float32 candidates
    with int64 ids.

    Every argument is validated here, in Python, and a bad one raises ``ValueError``: the C++ checks inside
    the op stay as internal guards, but an exception thrown from inside the custom op crashed the whole
    process on the first GPU run (torch 2.11 + cu130), so callers never rely on it.
    """
    if not isinstance(vals, torch.Tensor) or not isinstance(ids, torch.Tensor):
        raise ValueError("topk_merge: values and ids must be tensors")
    if not (vals.is_cuda and ids.is_cuda):
        raise ValueError(f"topk_merge: values and ids must be CUDA tensors, got {vals.device} and {ids.device}")
    if vals.device != ids.device:
        raise ValueError(f"topk_merge: ids and values must share a device, got {vals.device} and {ids.device}")
    if vals.dim() != 2:
        raise ValueError(f"topk_merge: values must be 2-D [rows, candidates], got {vals.dim()}-D")
    if ids.shape != vals.shape:
        raise ValueError(f"topk_merge: ids must have the shape of values {list(vals.shape)}, got {list(ids.shape)}")
    if vals.dtype != torch.float32:
        raise ValueError(f"topk_merge: values must be float32, got {vals.dtype}")
    if ids.dtype != torch.int64:
        raise ValueError(f"topk_merge: ids must be int64, got {ids.dtype}")
    M = vals.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= M:
        raise ValueError(f"topk_merge: k must be an int in [1, {M}], got {k!r}")
    if M > TOPK_MERGE_MAX:
        raise ValueError(f"topk_merge: at most {TOPK_MERGE_MAX} candidates per row, got {M}")
    import copsd._cuda  # noqa: F401  (registers torch.ops.copsd_cuda)

    return torch.ops.copsd_cuda.topk_merge(vals.contiguous(), ids.contiguous(), k)


def _logits_f32(x, w):
    if x.dtype == torch.float32 or not x.is_cuda:
        return x.float() @ w.float().T
    try:
        return torch.mm(x, w.T, out_dtype=torch.float32)
    except (RuntimeError, TypeError):  # a torch without mm(out_dtype=)
        return x.float() @ w.float().T


def topk(hidden, weight, k, logit):
    """Top-k ids, their log-probs and the row LSE; fp32 statistics."""
    N, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    ids = torch.empty(N, k, dtype=torch.int64, device=dev)
    lp = torch.empty(N, k, dtype=torch.float32, device=dev)
    lse = torch.empty(N, dtype=torch.float32, device=dev)
    weight = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
    T = max(1, min(N, CHUNK_BYTES // (8 * V)))
    width = max(k, -(-V // SPLITS))
    for n0 in range(0, N, T):
        n1 = min(N, n0 + T)
        z, _ = transform(_logits_f32(hidden[n0:n1], weight), logit)
        lse[n0:n1] = torch.logsumexp(z, dim=1)
        vals, cols = [], []
        for v0 in range(0, V, width):
            v, i = z[:, v0:v0 + width].topk(min(k, z[:, v0:v0 + width].shape[1]), dim=1)
            vals.append(v)
            cols.append(i + v0)
        vals, cols = torch.cat(vals, 1), torch.cat(cols, 1)
        if vals.shape[1] > k and vals.is_cuda and usable(vals.shape[1]):
            vals, cols = topk_merge(vals, cols, k)
        elif vals.shape[1] > k:
            vals, sel = vals.topk(k, dim=1)
            cols = cols.gather(1, sel)
        ids[n0:n1] = cols
        lp[n0:n1] = vals - lse[n0:n1, None]
    return ids, lp, lse
