"""Triton host code of ``linear_divergence``: the kernel-level ``divergence`` of ``copsd.backends``.

* full support, fused path: ``copsd_kernels.linear_divergence`` computes the student and the teacher tile in
  one program (``pair_stats_kernel``; ``pair_sum_kernel`` for jsd / term_clip; ``pair_grad_kernel``).
* full support, chunked path: cuBLAS logits of both sides per token chunk + ``linear_rows.div_row_kernel``.
* teacher-top-k support (either path): the k logits per token by a chunked torch gather-GEMM, the [N, k]
  support math of the reference backend (``reference.support_terms``), the full-vocabulary LSEs and tail
  from ``row_stats`` and the dense part of the gradient from ``dense_grad``.

``path`` is "fused" or "chunked"; GEMM and chunk plumbing in ``copsd.backends._triton_common``.
"""

from __future__ import annotations

import math

import torch
import triton

from copsd.backends import _triton_common as C
from copsd.backends.reference import chain_rule, support_terms, transform
from copsd_kernels import _common as kc
from copsd_kernels import linear_divergence as kdiv
from copsd_kernels import linear_logprobs as klp
from copsd_kernels import linear_rows as krow

_KIND = {"reverse_kl": kdiv.REVERSE_KL, "forward_kl": kdiv.FORWARD_KL, "jsd": kdiv.JSD}


def divergence(s_hidden, s_weight, t_hidden, t_weight, logit, div, topk_ids=None, token_grad=None, path=None):
    path = C.check_path(path)
    N, H = s_hidden.shape
    if N == 0:
        loss = torch.zeros(0, dtype=torch.float32, device=s_hidden.device)
        if token_grad is None:
            return loss, None, None
        return (loss, torch.zeros(0, H, dtype=torch.float32, device=s_hidden.device),
                torch.zeros(s_weight.shape, dtype=torch.float32, device=s_hidden.device))
    s_weight = C.like(s_weight, s_hidden)
    t_hidden = C.like(t_hidden, s_hidden)
    t_weight = C.like(t_weight, s_hidden)
    if div.support == "teacher_topk":
        return _topk_support(s_hidden, s_weight, t_hidden, t_weight, logit, div, topk_ids, token_grad)
    if path == "chunked":
        return _div_chunked(s_hidden, s_weight, t_hidden, t_weight, logit, div, token_grad)
    return _full_support(s_hidden, s_weight, t_hidden, t_weight, logit, div, token_grad)


def _div_args(div):
    beta = float(div.beta) if div.kind == "jsd" else 0.5
    clip = float(div.term_clip) if div.term_clip is not None else 0.0
    return beta, math.log(beta), math.log1p(-beta), clip


# ----------------------------------------------------------------------------- full support, fused path


def _pair_launch_common(s_hidden, s_weight, t_hidden, t_weight):
    return (s_hidden.stride(0), s_weight.stride(0), t_hidden.stride(0), t_weight.stride(0))


def _full_support(s_hidden, s_weight, t_hidden, t_weight, logit, div, token_grad):
    N, H = s_hidden.shape
    Ht = t_hidden.shape[1]
    V = s_weight.shape[0]
    dev = s_hidden.device
    cfg = kc.tile_config(min(H, Ht), two_sided=True, dtype=s_hidden.dtype)
    nbv = triton.cdiv(V, cfg["BLOCK_V"])
    (scale, cap, inv_t), has_cap = C.logit_args(logit)
    upcast, ieee = kc.kernel_flags(s_hidden)
    strides = _pair_launch_common(s_hidden, s_weight, t_hidden, t_weight)
    blocks = dict(BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"],
                  HAS_SOFTCAP=has_cap, UPCAST=upcast, IEEE=ieee, **kc.launch_kwargs(cfg))
    state = torch.empty(6, nbv, N, dtype=torch.float32, device=dev)
    kdiv.pair_stats_kernel[klp.grid_tiles(N, V, cfg)](
        s_hidden, s_weight, t_hidden, t_weight, state, N, V, H, Ht, *strides, scale, cap, inv_t, **blocks)
    Ms, Ss = kc.merge_lse(state[0], state[1])
    Mt, St = kc.merge_lse(state[2], state[3])
    lse_s, lse_t = Ms + torch.log(Ss), Mt + torch.log(St)
    kind = _KIND[div.kind]
    beta, log_beta, log_1mb, clip = _div_args(div)
    # per-tile shift to the row maxes of the relative difference (see copsd_kernels/linear_divergence.py)
    c = (state[0] - Ms) - (state[2] - Mt)
    if div.term_clip is None and kind == kdiv.REVERSE_KL:
        A = (torch.exp(state[0] - Ms) * (state[4] + state[1] * c)).sum(0)
        loss = A / Ss - torch.log(Ss) + torch.log(St)
        G = loss + 1.0
    elif div.term_clip is None and kind == kdiv.FORWARD_KL:
        B = (torch.exp(state[2] - Mt) * (state[5] - state[3] * c)).sum(0)
        loss = B / St - torch.log(St) + torch.log(Ss)
        G = torch.full_like(loss, -1.0)
    else:
        # jsd / term_clip: no one-pass form; second pass with the row LSEs known.
        sums = torch.empty(2, nbv, N, dtype=torch.float32, device=dev)
        kdiv.pair_sum_kernel[klp.grid_tiles(N, V, cfg)](
            s_hidden, s_weight, t_hidden, t_weight, lse_s, lse_t, sums, N, V, H, Ht, *strides,
            scale, cap, inv_t, beta, log_beta, log_1mb, clip, KIND=kind,
            CLIP=div.term_clip is not None, **blocks)
        loss, G = sums[0].sum(0), sums[1].sum(0)
    if token_grad is None:
        return loss, None, None
    tg = token_grad.float().contiguous()

    def launch(dz, v0, v1):
        kdiv.pair_grad_kernel[klp.grid_tiles(N, v1 - v0, cfg)](
            s_hidden, s_weight[v0:v1], t_hidden, t_weight[v0:v1], lse_s, lse_t, G.contiguous(), tg, dz,
            N, v1 - v0, H, Ht, *strides, dz.stride(0), scale, cap, inv_t, beta, log_beta, log_1mb, clip,
            KIND=kind, CLIP=div.term_clip is not None, **blocks)

    dx, dw = C.grad_from_tiles(s_hidden, s_weight, launch)
    return loss, dx, dw


# ----------------------------------------------------------------------------- full support, chunked path


def _div_chunked(s_hidden, s_weight, t_hidden, t_weight, logit, div, token_grad):
    N, H = s_hidden.shape
    V = s_weight.shape[0]
    dev = s_hidden.device
    grad = token_grad is not None
    gdt = C.grad_dtype(s_hidden)
    gsize = torch.empty((), dtype=gdt).element_size()
    T = C.chunk_rows(N, V, V * (8 + (gsize if grad else 0)))
    zs = torch.empty(T, V, dtype=torch.float32, device=dev)
    zt = torch.empty(T, V, dtype=torch.float32, device=dev)
    loss = torch.empty(N, dtype=torch.float32, device=dev)
    dz = torch.empty(T, V, dtype=gdt, device=dev) if grad else zs
    tg = token_grad.float().contiguous() if grad else loss
    dx = torch.empty(N, H, dtype=torch.float32, device=dev) if grad else None
    dw = torch.empty(V, H, dtype=torch.float32, device=dev) if grad else None
    (scale, cap, inv_t), has_cap = C.logit_args(logit)
    beta, log_beta, log_1mb, clip = _div_args(div)
    block, launch = C.row_cfg()
    for n0 in range(0, N, T):
        n1 = min(N, n0 + T)
        a, b, d = zs[: n1 - n0], zt[: n1 - n0], dz[: n1 - n0]
        C.mm_f32(s_hidden[n0:n1], s_weight.t(), a)
        C.mm_f32(t_hidden[n0:n1], t_weight.t(), b)
        krow.div_row_kernel[(n1 - n0,)](
            a, b, loss[n0:n1], tg[n0:n1], d, V, a.stride(0), b.stride(0), d.stride(0),
            scale, cap, inv_t, beta, log_beta, log_1mb, clip,
            BLOCK=block, HAS_SOFTCAP=has_cap, KIND=_KIND[div.kind], CLIP=div.term_clip is not None,
            GRAD=grad, **launch)
        if grad:
            C.chunk_grads(d, s_hidden[n0:n1], s_weight, dx[n0:n1], dw, n0 == 0)
    return loss, dx, dw


# ----------------------------------------------------------------------------- teacher-top-k support


def _gather_rows(x, w, K, logit):
    """Logits z[n, j] = transform(x_n . w_{K[n, j]}) and the softcap's tanh (or None), fp32, chunked."""
    N, H = x.shape
    k = K.shape[1]
    z = torch.empty(N, k, dtype=torch.float32, device=x.device)
    th = torch.empty_like(z) if logit.softcap is not None else None
    chunk = max(1, C.GATHER_ELEMS // max(1, k * H))
    for n0 in range(0, N, chunk):
        n1 = min(N, n0 + chunk)
        r = torch.einsum("ch,ckh->ck", x[n0:n1].float(), w[K[n0:n1]].float())
        z[n0:n1], t = transform(r, logit)
        if th is not None:
            th[n0:n1] = t
    return z, th


def _scatter_sparse(x, w, K, dzK, dx, dw):
    """dx[n] += sum_j dzK[n,j] w[K[n,j]];  dw[K[n,j]] += dzK[n,j] x[n]   (chunked, fp32)."""
    N, H = x.shape
    k = K.shape[1]
    chunk = max(1, C.GATHER_ELEMS // max(1, k * H))
    for n0 in range(0, N, chunk):
        n1 = min(N, n0 + chunk)
        xc = x[n0:n1].float()
        dx[n0:n1] += torch.einsum("ck,ckh->ch", dzK[n0:n1], w[K[n0:n1]].float())
        dw.index_add_(0, K[n0:n1].reshape(-1), (dzK[n0:n1, :, None] * xc[:, None, :]).reshape(-1, H))


def _topk_support(s_hidden, s_weight, t_hidden, t_weight, logit, div, K, token_grad):
    N, H = s_hidden.shape
    V = s_weight.shape[0]
    k = K.shape[1]
    K = K.contiguous()
    zsK, thK = _gather_rows(s_hidden, s_weight, K, logit)
    ztK, _ = _gather_rows(t_hidden, t_weight, K, logit)
    bucket = div.tail == "bucket" and k < V
    ss = st = C.Stats()  # renorm: the support's own LSEs only
    if div.tail != "renorm":
        ss = C.row_stats(s_hidden, s_weight, logit, kset=K if bucket else None)
        st = C.row_stats(t_hidden, t_weight, logit, kset=K if bucket else None)
    loss, g, g_t, ls_tail, G, Ls = support_terms(zsK, ss.lse, ss.tail_lse, ztK, st.lse, st.tail_lse, div, bucket)
    if token_grad is None:
        return loss, None, None
    tg = token_grad.float()
    if div.tail == "renorm":
        sparse = tg[:, None] * (g - torch.exp(zsK - Ls[:, None]) * G[:, None])
        dx = torch.zeros(N, H, dtype=torch.float32, device=s_hidden.device)
        dw = torch.zeros(V, H, dtype=torch.float32, device=s_hidden.device)
    else:
        sparse = tg[:, None] * g
        tail = None
        if bucket:
            tail = ((tg * g_t).contiguous(), ls_tail.contiguous(), K)
        dx, dw = C.dense_grad(s_hidden, s_weight, logit, Ls.contiguous(), (tg * G).contiguous(), tail=tail)
    dzK = chain_rule(sparse, thK, logit)
    _scatter_sparse(s_hidden, s_weight, K, dzK, dx, dw)
    return loss, dx, dw

