"""Triton host code of ``linear_logprobs`` / ``linear_logprobs_loss``: the kernel-level functions
``logprobs_forward``, ``logprobs_backward`` and ``logprobs_loss`` of ``copsd.backends`` (see its docstring).

Kernels: ``copsd_kernels.linear_logprobs`` (fused path: ``row_stats_kernel``, ``dense_grad_kernel``) and
``copsd_kernels.linear_rows`` (chunked path: ``lp_row_kernel``, ``lp_grad_row_kernel``).  GEMM and chunk
plumbing: ``copsd.backends._triton_common``.  ``path`` is "fused" or "chunked" (dispatch passes it).
"""

from __future__ import annotations

import torch

from copsd.backends import _triton_common as C
from copsd_kernels import linear_rows as krow


def logprobs_forward(hidden, weight, ids, logit, path=None):
    path = C.check_path(path)
    weight = C.like(weight, hidden)
    N = hidden.shape[0]
    if N == 0:
        e = torch.empty(0, dtype=torch.float32, device=hidden.device)
        return e, e.clone(), e.clone()
    if path == "chunked":
        zid, ent, lse = _forward_chunked(hidden, weight, ids, logit)
        return zid - lse, ent, lse
    st = C.row_stats(hidden, weight, logit, ids=ids, entropy=True)
    return st.zid - st.lse, st.entropy, st.lse


def logprobs_backward(hidden, weight, ids, lse, entropy, g_logprobs, g_entropy, g_lse, logit, path=None):
    path = C.check_path(path)
    weight = C.like(weight, hidden)
    N = hidden.shape[0]
    zero = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    g_lp = zero if g_logprobs is None else g_logprobs.float()
    g_ls = zero if g_lse is None else g_lse.float()
    a = g_lp - g_ls
    b = None
    if g_entropy is not None:
        b = g_entropy.float().contiguous()
        a = a + b * entropy.float()
    if N == 0:
        return (torch.zeros(0, hidden.shape[1], dtype=torch.float32, device=hidden.device),
                torch.zeros(weight.shape, dtype=torch.float32, device=hidden.device))
    if path == "chunked":
        return _backward_chunked(hidden, weight, ids, lse.float().contiguous(), a.contiguous(), b,
                                 g_lp.contiguous() if g_logprobs is not None else None, logit)
    gather = (ids, g_lp.contiguous()) if g_logprobs is not None else None
    return C.dense_grad(hidden, weight, logit, lse.float().contiguous(), a.contiguous(), b=b, gather=gather)


def logprobs_loss(hidden, weight, ids, logit, coeff, path=None):
    """Per-token loss with the gradient in the forward pass; ``None`` where this path has no fused form (the
    op layer then runs forward, ``coeff``, backward)."""
    if C.check_path(path) != "chunked" or hidden.shape[0] == 0:
        return None
    return _loss_chunked(hidden, C.like(weight, hidden), ids, logit, coeff)


# ----------------------------------------------------------------------------- chunked path


def _forward_chunked(hidden, weight, ids, logit):
    N = hidden.shape[0]
    lse, ent, zid = (torch.empty(N, dtype=torch.float32, device=hidden.device) for _ in range(3))
    for _ in C.row_stat_chunks(hidden, weight, logit, lse, ent=ent, ids=ids, zid=zid):
        pass
    return zid, ent, lse


def _grad_chunked(hidden, weight, ids, logit, chunk_coeffs):
    """The gradient chunk loop of the log-prob ops: per token chunk [n0, n1), the logits GEMM into an fp32
    buffer, ``chunk_coeffs(n0, n1, z)`` -> the chunk's (lse, a, b | None, c | None) (it may run row kernels on
    the logits ``z``), the row gradient dz = -q (a + b ls) + [j == id] c, then the dX / dW GEMMs."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    gdt = C.grad_dtype(hidden)
    T = C.chunk_rows(N, V, V * (4 + torch.empty((), dtype=gdt).element_size()))
    z = torch.empty(T, V, dtype=torch.float32, device=dev)
    dz = torch.empty(T, V, dtype=gdt, device=dev)
    dx = torch.empty(N, H, dtype=torch.float32, device=dev)
    dw = torch.empty(V, H, dtype=torch.float32, device=dev)
    f32 = torch.zeros(1, dtype=torch.float32, device=dev)
    (scale, cap, inv_t), has_cap = C.logit_args(logit)
    block, launch = C.row_cfg()
    for n0 in range(0, N, T):
        n1 = min(N, n0 + T)
        zc, d = z[: n1 - n0], dz[: n1 - n0]
        C.mm_f32(hidden[n0:n1], weight.t(), zc)
        lse, a, b, c = chunk_coeffs(n0, n1, zc)
        krow.lp_grad_row_kernel[(n1 - n0,)](
            zc, ids[n0:n1], lse, a, b if b is not None else f32, c if c is not None else f32, d, V,
            zc.stride(0), d.stride(0), scale, cap, inv_t,
            BLOCK=block, HAS_SOFTCAP=has_cap, HAS_B=b is not None, GATHER=c is not None, **launch)
        C.chunk_grads(d, hidden[n0:n1], weight, dx[n0:n1], dw, n0 == 0)
    return dx, dw


def _backward_chunked(hidden, weight, ids, lse, a, b, c, logit):
    def chunk_coeffs(n0, n1, z):
        return (lse[n0:n1], a[n0:n1], None if b is None else b[n0:n1], None if c is None else c[n0:n1])

    return _grad_chunked(hidden, weight, ids, logit, chunk_coeffs)


def _loss_chunked(hidden, weight, ids, logit, coeff):
    """Per-token loss, gradient in the forward pass: per token chunk, the logits GEMM, the row statistics,
    ``coeff`` (the chunk's d loss / d lp and d loss / d entropy), then the row gradients from the same logits
    buffer and the dX / dW GEMMs (3 GEMMs instead of the 4 of forward + recomputing backward)."""
    N, V = hidden.shape[0], weight.shape[0]
    lse, ent, zid = (torch.empty(N, dtype=torch.float32, device=hidden.device) for _ in range(3))
    (scale, cap, inv_t), has_cap = C.logit_args(logit)
    block, launch = C.row_cfg()

    def chunk_coeffs(n0, n1, z):
        krow.lp_row_kernel[(n1 - n0,)](
            z, ids[n0:n1], lse[n0:n1], ent[n0:n1], zid[n0:n1], V, z.stride(0),
            scale, cap, inv_t, BLOCK=block, HAS_SOFTCAP=has_cap, ENTROPY=True, GATHER=True, **launch)
        lp_c = zid[n0:n1] - lse[n0:n1]
        g_lp, g_ent = coeff(n0, n1 - n0, lp_c, ent[n0:n1])
        g_lp = torch.zeros_like(lp_c) if g_lp is None else g_lp.float().contiguous()
        # kernel form: dz = -q (a + b ls) + [j == id] c  with a = g_lp + g_ent H, b = g_ent, c = g_lp
        if g_ent is None:
            return lse[n0:n1], g_lp, None, g_lp
        g_ent = g_ent.float().contiguous()
        return lse[n0:n1], (g_lp + g_ent * ent[n0:n1]).contiguous(), g_ent, g_lp

    dx, dw = _grad_chunked(hidden, weight, ids, logit, chunk_coeffs)
    return zid - lse, ent, dx, dw

