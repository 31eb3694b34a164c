"""Host side of the Triton lm_head ops (kernels in ``copsd_kernels``, i.e. ``kernels/``).

Implements the kernel-level interface of ``copsd.backends`` (see its docstring):
``logprobs_forward``, ``logprobs_backward``, ``topk``, ``divergence``.

Two GPU paths, chosen by ``COPSD_TRITON_PATH`` = ``auto`` (default: ``fused``) | ``fused`` | ``chunked``;
neither ever holds an ``[N, V]`` tensor:

* ``chunked`` (opt-in until verified on a GPU; designed to be the faster one: 4 GEMMs per gradient
  step instead of 6 GEMM-equivalents): per token chunk of T rows (all ``[T, V]``
  buffers within ``CHUNK_BYTES``), cuBLAS computes the raw logits with fp32 output, ONE Triton row
  kernel per chunk (``kernels/linear_rows.py``) reduces every row (LSE, entropy, gathered logit,
  divergence) and writes dZ in the input dtype, then dX[chunk] = dZ W and dW += dZ^T X[chunk] with
  fp32 accumulation (``torch.mm/addmm(out_dtype=float32)``).  A divergence step with the gradient is
  4 GEMMs; log-probs 1 (forward) + 3 (backward); top-k = GEMM + ``torch.topk`` + the row LSE.
  The teacher-top-k support keeps the fused-path code below.

``fused`` path (tile-fused GEMM + epilogue kernels):

* statistics: one Triton program per [BLOCK_N x BLOCK_V] logits tile (GEMM mainloop over H,
  fp32 accumulate) reduces the tile to per-row partial states; the [V/BLOCK_V, N] states are
  merged here with a few small torch ops.  Full-support divergences compute the student and the
  teacher tile in the same program.
* gradients: the tiles are recomputed, vocabulary slice by vocabulary slice, into a bounded
  ``[N, V_slice]`` workspace (``WORKSPACE_BYTES``); then ``dW[slice] = dZ^T X`` (one GEMM over
  all N tokens with fp32 accumulation, written straight into the fp32 ``d_weight``) and
  ``dX += dZ W[slice]`` (fp32).
* top-k: running top-k per vocabulary split in the kernel, candidates merged by the CUDA
  ``topk_merge`` op when ``copsd._cuda`` is built, ``torch.topk`` otherwise.

Paths that are simpler on purpose (still bounded memory): the teacher-top-k support gathers the
k logits per token with a chunked torch gather-GEMM and does the [N, k] support math in torch;
top-k with k > 256 runs a token-chunked GEMM + ``torch.topk``; float64 inputs use the reference
backend (Triton's tensor cores have no fp64 path worth a kernel).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import torch
import triton


def _load_kernels():
    try:
        import copsd_kernels  # noqa: F401
    except ImportError:
        # Source checkout without `pip install -e .`: map <repo>/kernels to copsd_kernels.
        init = Path(__file__).resolve().parents[2] / "kernels" / "__init__.py"
        spec = importlib.util.spec_from_file_location(
            "copsd_kernels", init, submodule_search_locations=[str(init.parent)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["copsd_kernels"] = mod
        spec.loader.exec_module(mod)


_load_kernels()

from copsd_kernels import _common as kc  # noqa: E402
from copsd_kernels import linear_divergence as kdiv  # noqa: E402
from copsd_kernels import linear_logprobs as klp  # noqa: E402
from copsd_kernels import linear_rows as krow  # noqa: E402
from copsd_kernels import linear_topk as ktop  # noqa: E402

WORKSPACE_BYTES = 256 << 20  # gradient workspace [N, V_slice]
GATHER_ELEMS = 1 << 24  # [chunk, k, H] fp32 elements of the top-k support gather
CHUNK_BYTES = 1 << 30  # all [T, V] buffers of one token chunk of the chunked path together
PATHS = ("auto", "fused", "chunked")


def _path():
    """Which GPU path: ``COPSD_TRITON_PATH`` = fused | chunked | auto.

    ``auto`` is the fused path: it is the one verified on a GPU so far (H200, 2026-11-27).  The
    chunked path passes every CPU (interpreter) test but has not run on a GPU yet, so it is
    opt-in until a GPU check verifies it (benchmarks/gpu_check.sh)."""
    p = os.environ.get("COPSD_TRITON_PATH", "auto").strip().lower() or "auto"
    if p not in PATHS:
        raise ValueError(f"COPSD_TRITON_PATH must be one of {list(PATHS)}, got {p!r}")
    return "chunked" if p == "chunked" else "fused"


def _dispatch(chunked, fused):
    """Run ``chunked()`` or ``fused()`` per ``COPSD_TRITON_PATH``."""
    return chunked() if _path() == "chunked" else fused()


def _reference():
    from copsd.backends import reference

    return reference


def _logit_args(logit):
    softcap = logit.softcap
    return (float(logit.logit_scale), float(softcap) if softcap is not None else 1.0,
            1.0 / float(logit.temperature)), softcap is not None


def _like(weight, hidden):
    """tl.dot needs one operand dtype; a weight in another dtype is cast (copy) to the hidden's."""
    return weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)


def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# ----------------------------------------------------------------------------- statistics


class _Stats:
    lse = entropy = zid = tail_lse = None


def _row_stats(hidden, weight, logit, ids=None, kset=None, entropy=False):
    """Full-vocabulary LSE (+ entropy, logit at ids, LSE over V minus the row's kset)."""
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = kc.tile_config(H, dtype=hidden.dtype)
    nbv = triton.cdiv(V, cfg["BLOCK_V"])
    nstate = 2 + int(entropy) + 2 * int(kset is not None)
    dev = hidden.device
    state = torch.empty(nstate, nbv, N, dtype=torch.float32, device=dev)
    zid = torch.zeros(N if ids is not None else 1, dtype=torch.float32, device=dev)
    dummy = torch.zeros(1, dtype=torch.int64, device=dev)
    (scale, cap, inv_t), has_cap = _logit_args(logit)
    upcast, ieee = kc.kernel_flags(hidden)
    klp.row_stats_kernel[klp.grid_tiles(N, V, cfg)](
        hidden, weight, ids if ids is not None else dummy, kset if kset is not None else dummy,
        state, zid, N, V, H, kset.shape[1] if kset is not None else 0,
        hidden.stride(0), weight.stride(0), scale, cap, inv_t,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"],
        HAS_SOFTCAP=has_cap, UPCAST=upcast, IEEE=ieee, ENTROPY=entropy,
        GATHER=ids is not None, EXCLUDE=kset is not None, **kc.launch_kwargs(cfg))
    out = _Stats()
    m, s = state[0], state[1]
    M, S = kc.merge_lse(m, s)
    out.lse = M + torch.log(S)
    slot = 2
    if entropy:
        # W_i is relative to the tile max m_i; shift every tile to the row max M.
        r = torch.exp(m - M)
        w = (r * (state[2] + s * (m - M))).sum(0)
        out.entropy = torch.log(S) - w / S
        slot = 3
    if kset is not None:
        Mt, St = kc.merge_lse(state[slot], state[slot + 1])
        out.tail_lse = Mt + torch.log(St)
    if ids is not None:
        out.zid = zid
    return out


# ----------------------------------------------------------------------------- gradient GEMMs

_OUT_DTYPE = {"ok": None}


def _mm_f32(a, b, out):
    """out(fp32) = a @ b with fp32 accumulation and fp32 output, for any input dtype."""
    if a.dtype == torch.float32:
        torch.mm(a, b, out=out)
        return
    if _OUT_DTYPE["ok"] is not False and a.is_cuda:
        try:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
            _OUT_DTYPE["ok"] = True
            return
        except (RuntimeError, TypeError):
            _OUT_DTYPE["ok"] = False
    if not a.is_cuda:
        torch.mm(a.float(), b.float(), out=out)  # CPU (interpreter tests): exact fp32 products
        return
    out.copy_(torch.mm(a, b))  # CUDA torch without mm(out_dtype=): last resort, bf16-rounded product


_ADDMM_OK: dict = {}


def _probe_addmm(device, dtype):
    """Does ``torch.addmm(c, a, b, out_dtype=float32, out=c)`` accumulate correctly in place here?"""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(96, 64, device=device, generator=g).to(dtype).t()  # transposed, like dZ^T
        b = torch.randn(96, 80, device=device, generator=g).to(dtype)
        c = torch.randn(64, 80, device=device, generator=g)
        want = c + a.float() @ b.float()
        torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
        return bool(torch.allclose(c, want, atol=1e-3, rtol=1e-3))
    except (RuntimeError, TypeError):
        return False


def _addmm_f32(out, a, b):
    """out(fp32) += a @ b with fp32 accumulation (the dW accumulation over token chunks).

    CUDA: cuBLAS addmm with a bf16/fp16 A/B and the fp32 C accumulated in place (one read + one
    write of C).  Where that is unavailable (checked once per device and dtype): an fp32 product of
    a vocabulary slice at a time added to ``out`` (bounded temporary)."""
    if a.dtype == torch.float32 or not a.is_cuda:
        out.addmm_(a.float(), b.float())
        return
    key = (a.device, a.dtype)
    if key not in _ADDMM_OK:
        _ADDMM_OK[key] = _probe_addmm(a.device, a.dtype)
    if _ADDMM_OK[key]:
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        return
    rows = max(1, (64 << 20) // (4 * out.shape[1]))
    tmp = torch.empty(min(rows, out.shape[0]), out.shape[1], dtype=torch.float32, device=out.device)
    for r0 in range(0, out.shape[0], rows):
        r1 = min(out.shape[0], r0 + rows)
        _mm_f32(a[r0:r1], b, tmp[: r1 - r0])
        out[r0:r1] += tmp[: r1 - r0]


def _vocab_slices(N, V, elem_bytes, block_v):
    width = max(block_v, WORKSPACE_BYTES // max(1, N * elem_bytes) // block_v * block_v)
    for v0 in range(0, V, width):
        yield v0, min(V, v0 + width), width


def _grad_from_tiles(hidden, weight, launch):
    """Run ``launch(ws_view, v0, v1)`` (writes d(x.w^T) for vocab slice [v0, v1) of all tokens)
    per slice and turn each slice into dX (fp32, accumulated) and dW[slice] (fp32)."""
    N, H = hidden.shape
    V = weight.shape[0]
    ws_dtype = hidden.dtype if hidden.dtype in (torch.bfloat16, torch.float16) else torch.float32
    dx = torch.zeros(N, H, dtype=torch.float32, device=hidden.device)
    dw = torch.empty(V, H, dtype=torch.float32, device=hidden.device)
    if N == 0:
        return dx, dw.zero_()
    esize = torch.empty((), dtype=ws_dtype).element_size()
    ws = None
    part = None
    for v0, v1, width in _vocab_slices(N, V, esize, kc.tile_config(H)["BLOCK_V"]):
        if ws is None:
            ws = torch.empty(N, min(width, V), dtype=ws_dtype, device=hidden.device)
            part = torch.empty(N, H, dtype=torch.float32, device=hidden.device) if v1 < V else None
        dz = ws[:, : v1 - v0]
        launch(dz, v0, v1)
        _mm_f32(dz.t(), hidden, dw[v0:v1])
        if part is None:
            _mm_f32(dz, weight[v0:v1], dx)
        else:
            _mm_f32(dz, weight[v0:v1], part)
            dx += part
    return dx, dw


def _dense_grad(hidden, weight, logit, lse, a, b=None, tail=None, gather=None):
    """Gradient of the dense form dz_j = -q_j (a + b ls_j) + [j not in K] t exp(ls_j - u)
    + [j == id] c  (tail = (t, u, K), gather = (ids, c)); per-row vectors fp32 [N]."""
    N, H = hidden.shape
    cfg = kc.tile_config(H, dtype=hidden.dtype)
    (scale, cap, inv_t), has_cap = _logit_args(logit)
    upcast, ieee = kc.kernel_flags(hidden)
    f32 = torch.zeros(1, dtype=torch.float32, device=hidden.device)
    i64 = torch.zeros(1, dtype=torch.int64, device=hidden.device)
    t, u, kset = tail if tail is not None else (f32, f32, i64)
    ids, c = gather if gather is not None else (i64, f32)

    def launch(dz, v0, v1):
        klp.dense_grad_kernel[klp.grid_tiles(N, v1 - v0, cfg)](
            hidden, weight[v0:v1], lse, a, b if b is not None else f32, t, u, ids, c, kset, dz,
            N, v1 - v0, H, kset.shape[1] if tail is not None else 0, v0,
            hidden.stride(0), weight.stride(0), dz.stride(0), scale, cap, inv_t,
            BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"],
            HAS_SOFTCAP=has_cap, UPCAST=upcast, IEEE=ieee, HAS_B=b is not None,
            HAS_TAIL=tail is not None, GATHER=gather is not None, **kc.launch_kwargs(cfg))

    return _grad_from_tiles(hidden, weight, launch)



# ----------------------------------------------------------------------------- chunked path
#
# "chunked cuBLAS + fused row kernel": per token chunk of T rows, cuBLAS writes the raw logits
# x . w^T into fp32 [T, V] buffers (bf16/fp16 operands with fp32 output: the statistics keep the
# accuracy of the fused path's fp32 accumulators), ONE Triton row kernel per chunk reduces each row
# (and writes dZ in the input dtype), then dX[chunk] = dZ W and dW += dZ^T X[chunk] (fp32).  A
# divergence gradient step is 4 GEMMs (2 logits, dX, dW) instead of the fused path's 6
# GEMM-equivalents; memory is bounded by CHUNK_BYTES.  dZ has its own buffer (not written over
# the student logits): those are fp32 while dZ is in the input dtype for the tensor-core GEMMs.


def _row_cfg():
    if kc.interpreting():
        return 32, {}
    return 2048, dict(num_warps=8)


def _chunk_rows(N, V, row_bytes):
    t = max(1, CHUNK_BYTES // max(1, row_bytes))
    if t >= 128:
        t = t // 128 * 128
    return min(N, t)


def _grad_dtype(hidden):
    return hidden.dtype if hidden.dtype in (torch.bfloat16, torch.float16) else torch.float32


def _chunk_grads(dz, x_chunk, weight, dx_chunk, dw, first):
    _mm_f32(dz, weight, dx_chunk)
    if first:
        _mm_f32(dz.t(), x_chunk, dw)
    else:
        _addmm_f32(dw, dz.t(), x_chunk)


def _div_chunked(s_hidden, s_weight, t_hidden, t_weight, logit, div, token_grad):
    N, H = s_hidden.shape
    V = s_weight.shape[0]
    dev = s_hidden.device
    grad = token_grad is not None
    gdt = _grad_dtype(s_hidden)
    gsize = torch.empty((), dtype=gdt).element_size()
    T = _chunk_rows(N, V, V * (8 + (gsize if grad else 0)))
    zs = torch.empty(T, V, dtype=torch.float32, device=dev)
    zt = torch.empty(T, V, dtype=torch.float32, device=dev)
    loss = torch.empty(N, dtype=torch.float32, device=dev)
    dz = torch.empty(T, V, dtype=gdt, device=dev) if grad else zs
    tg = token_grad.float().contiguous() if grad else loss
    dx = torch.empty(N, H, dtype=torch.float32, device=dev) if grad else None
    dw = torch.empty(V, H, dtype=torch.float32, device=dev) if grad else None
    (scale, cap, inv_t), has_cap = _logit_args(logit)
    beta, log_beta, log_1mb, clip = _div_args(div)
    block, launch = _row_cfg()
    for n0 in range(0, N, T):
        n1 = min(N, n0 + T)
        a, b, d = zs[: n1 - n0], zt[: n1 - n0], dz[: n1 - n0]
        _mm_f32(s_hidden[n0:n1], s_weight.t(), a)
        _mm_f32(t_hidden[n0:n1], t_weight.t(), b)
        krow.div_row_kernel[(n1 - n0,)](
            a, b, loss[n0:n1], tg[n0:n1], d, V, a.stride(0), b.stride(0), d.stride(0),
            scale, cap, inv_t, beta, log_beta, log_1mb, clip,
            BLOCK=block, HAS_SOFTCAP=has_cap, KIND=_KIND[div.kind], CLIP=div.term_clip is not None,
            GRAD=grad, **launch)
        if grad:
            _chunk_grads(d, s_hidden[n0:n1], s_weight, dx[n0:n1], dw, n0 == 0)
    return loss, dx, dw


def _row_stat_chunks(hidden, weight, logit, lse, ent=None, ids=None, zid=None):
    """Yield ``(n0, n1, z)`` per token chunk after the cuBLAS logits GEMM into an fp32 buffer ``z`` and the row
    kernel's statistics: the LSE into ``lse``, the entropy into ``ent`` and the logit at ``ids`` into ``zid``
    when given."""
    N, V = hidden.shape[0], weight.shape[0]
    T = _chunk_rows(N, V, 4 * V)
    z = torch.empty(T, V, dtype=torch.float32, device=hidden.device)
    (scale, cap, inv_t), has_cap = _logit_args(logit)
    block, launch = _row_cfg()
    for n0 in range(0, N, T):
        n1 = min(N, n0 + T)
        zc = z[: n1 - n0]
        _mm_f32(hidden[n0:n1], weight.t(), zc)
        krow.lp_row_kernel[(n1 - n0,)](
            zc, lse if ids is None else ids[n0:n1], lse[n0:n1], lse if ent is None else ent[n0:n1],
            lse if zid is None else zid[n0:n1], V, zc.stride(0), scale, cap, inv_t,
            BLOCK=block, HAS_SOFTCAP=has_cap, ENTROPY=ent is not None, GATHER=ids is not None, **launch)
        yield n0, n1, zc


def _lp_forward_chunked(hidden, weight, ids, logit):
    N = hidden.shape[0]
    lse, ent, zid = (torch.empty(N, dtype=torch.float32, device=hidden.device) for _ in range(3))
    for _ in _row_stat_chunks(hidden, weight, logit, lse, ent=ent, ids=ids, zid=zid):
        pass
    return zid, ent, lse


def _lp_grad_chunked(hidden, weight, ids, logit, chunk_coeffs):
    """The gradient chunk loop of the log-prob ops: per token chunk [n0, n1), the logits GEMM into an fp32
    buffer, ``chunk_coeffs(n0, n1, z)`` -> the chunk's (lse, a, b | None, c | None) (it may run row kernels on
    the logits ``z``), the row gradient dz = -q (a + b ls) + [j == id] c, then the dX / dW GEMMs."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    gdt = _grad_dtype(hidden)
    T = _chunk_rows(N, V, V * (4 + torch.empty((), dtype=gdt).element_size()))
    z = torch.empty(T, V, dtype=torch.float32, device=dev)
    dz = torch.empty(T, V, dtype=gdt, device=dev)
    dx = torch.empty(N, H, dtype=torch.float32, device=dev)
    dw = torch.empty(V, H, dtype=torch.float32, device=dev)
    f32 = torch.zeros(1, dtype=torch.float32, device=dev)
    (scale, cap, inv_t), has_cap = _logit_args(logit)
    block, launch = _row_cfg()
    for n0 in range(0, N, T):
        n1 = min(N, n0 + T)
        zc, d = z[: n1 - n0], dz[: n1 - n0]
        _mm_f32(hidden[n0:n1], weight.t(), zc)
        lse, a, b, c = chunk_coeffs(n0, n1, zc)
        krow.lp_grad_row_kernel[(n1 - n0,)](
            zc, ids[n0:n1], lse, a, b if b is not None else f32, c if c is not None else f32, d, V,
            zc.stride(0), d.stride(0), scale, cap, inv_t,
            BLOCK=block, HAS_SOFTCAP=has_cap, HAS_B=b is not None, GATHER=c is not None, **launch)
        _chunk_grads(d, hidden[n0:n1], weight, dx[n0:n1], dw, n0 == 0)
    return dx, dw


def _lp_backward_chunked(hidden, weight, ids, lse, a, b, c, logit):
    def chunk_coeffs(n0, n1, z):
        return (lse[n0:n1], a[n0:n1], None if b is None else b[n0:n1], None if c is None else c[n0:n1])

    return _lp_grad_chunked(hidden, weight, ids, logit, chunk_coeffs)


def _lp_loss_chunked(hidden, weight, ids, logit, coeff):
    """Per-token loss, gradient in the forward pass: per token chunk, the logits GEMM, the row statistics,
    ``coeff`` (the chunk's d loss / d lp and d loss / d entropy), then the row gradients from the same logits
    buffer and the dX / dW GEMMs (3 GEMMs instead of the 4 of forward + recomputing backward)."""
    N, V = hidden.shape[0], weight.shape[0]
    lse, ent, zid = (torch.empty(N, dtype=torch.float32, device=hidden.device) for _ in range(3))
    (scale, cap, inv_t), has_cap = _logit_args(logit)
    block, launch = _row_cfg()

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

    dx, dw = _lp_grad_chunked(hidden, weight, ids, logit, chunk_coeffs)
    return zid - lse, ent, dx, dw


def _transform_torch(r, logit):
    z = r * logit.logit_scale
    if logit.softcap is not None:
        z = logit.softcap * torch.tanh(z / logit.softcap)
    return z / logit.temperature


def _topk_chunked(hidden, weight, k, logit):
    """Token-chunked cuBLAS logits (fp32 output) + torch.topk + the row kernel's LSE.  The logit
    transform is increasing (positive scale, temperature, softcap), so the top k of the raw logits
    are the top k of the final ones."""
    N = hidden.shape[0]
    dev = hidden.device
    ids = torch.empty(N, k, dtype=torch.int64, device=dev)
    lp = torch.empty(N, k, dtype=torch.float32, device=dev)
    lse = torch.empty(N, dtype=torch.float32, device=dev)
    for n0, n1, zc in _row_stat_chunks(hidden, weight, logit, lse):
        v, i = zc.topk(k, dim=1)
        ids[n0:n1] = i
        lp[n0:n1] = _transform_torch(v, logit) - lse[n0:n1, None]
    return ids, lp, lse


# ----------------------------------------------------------------------------- log-probs


def logprobs_forward(hidden, weight, ids, logit):
    if hidden.dtype == torch.float64:
        return _reference().logprobs_forward(hidden, weight, ids, logit)
    weight = _like(weight, hidden)
    N = hidden.shape[0]
    if N == 0:
        e = torch.empty(0, dtype=torch.float32, device=hidden.device)
        return e, e.clone(), e.clone()
    def chunked():
        zid, ent, lse = _lp_forward_chunked(hidden, weight, ids, logit)
        return zid - lse, ent, lse

    def fused():
        st = _row_stats(hidden, weight, logit, ids=ids, entropy=True)
        return st.zid - st.lse, st.entropy, st.lse

    return _dispatch(chunked, fused)


def logprobs_backward(hidden, weight, ids, lse, entropy, g_logprobs, g_entropy, g_lse, logit):
    if hidden.dtype == torch.float64:
        return _reference().logprobs_backward(hidden, weight, ids, lse, entropy, g_logprobs,
                                              g_entropy, g_lse, logit)
    weight = _like(weight, hidden)
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
    def chunked():
        return _lp_backward_chunked(hidden, weight, ids, lse.float().contiguous(), a.contiguous(), b,
                                    g_lp.contiguous() if g_logprobs is not None else None, logit)

    def fused():
        gather = (ids, g_lp.contiguous()) if g_logprobs is not None else None
        return _dense_grad(hidden, weight, logit, lse.float().contiguous(), a.contiguous(), b=b,
                           gather=gather)

    return _dispatch(chunked, fused)


def logprobs_loss(hidden, weight, ids, logit, coeff):
    """Per-token loss with the gradient in the forward pass; ``None`` where this path has no fused form (the
    op layer then runs forward, ``coeff``, backward)."""
    if hidden.dtype == torch.float64 or _path() != "chunked" or hidden.shape[0] == 0:
        return None
    return _lp_loss_chunked(hidden, _like(weight, hidden), ids, logit, coeff)


# ----------------------------------------------------------------------------- top-k


TOPK_MERGE_MAX = 16384  # candidates per row the CUDA op handles (one block per row, shared memory)


def topk_merge(vals, ids, k):
    """Checked entry to ``torch.ops.copsd_cuda.topk_merge``: the k best (value descending, smaller id
    first on ties) of each row of [rows, M] float32 candidates with int64 ids.

    Every argument is validated here, in Python, and a bad one raises ``ValueError``: the C++
    checks inside the op stay as internal guards, but an exception thrown from inside the custom op
    crashed the whole process on the first GPU run (torch 2.11 + cu130), so callers never rely on it.
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


def _merge_candidates(vals, cols, k):
    """Top k (descending) of each row of [N, M] candidates."""
    if vals.shape[1] == k:
        return vals, cols
    if vals.is_cuda and vals.shape[1] <= TOPK_MERGE_MAX:
        try:
            return topk_merge(vals, cols, k)
        except (ImportError, AttributeError, RuntimeError):
            pass
    v, sel = vals.topk(k, dim=1)
    return v, cols.gather(1, sel)


def topk(hidden, weight, k, logit):
    if hidden.dtype == torch.float64:
        return _reference().topk(hidden, weight, k, logit)
    weight = _like(weight, hidden)
    N = hidden.shape[0]
    dev = hidden.device
    if N == 0:
        return (torch.empty(0, k, dtype=torch.int64, device=dev),
                torch.empty(0, k, dtype=torch.float32, device=dev),
                torch.empty(0, dtype=torch.float32, device=dev))
    KB = max(16, triton.next_power_of_2(k))
    if KB > 256:
        return _topk_chunked(hidden, weight, k, logit)
    return _dispatch(lambda: _topk_chunked(hidden, weight, k, logit),
                     lambda: _topk_fused(hidden, weight, k, logit, KB))


def _topk_fused(hidden, weight, k, logit, KB):
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    if kc.interpreting():
        BN, BH, launch = 16, 16, {}
    else:
        BN = 64 if KB <= 64 else 32
        BH = 64 if H >= 64 else max(16, triton.next_power_of_2(H))
        if hidden.dtype == torch.float32:
            BH = min(BH, 32)
        launch = dict(num_warps=8, num_stages=3)
    n_tiles = triton.cdiv(V, 2 * KB)
    n_rb = triton.cdiv(N, BN)
    splits = min(n_tiles, max(1, triton.cdiv(4 * _num_sms(dev), n_rb)), max(1, 4096 // k))
    per = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, per)
    vals = torch.empty(N, splits, k, dtype=torch.float32, device=dev)
    cols = torch.empty(N, splits, k, dtype=torch.int64, device=dev)
    state = torch.empty(2, splits, N, dtype=torch.float32, device=dev)
    (scale, cap, inv_t), has_cap = _logit_args(logit)
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


# ----------------------------------------------------------------------------- divergence

_KIND = {"reverse_kl": kdiv.REVERSE_KL, "forward_kl": kdiv.FORWARD_KL, "jsd": kdiv.JSD}


def _summand_torch(ls, lt, div):
    """Clipped summand and its ls-derivative on [N, k] support tensors (fp32)."""
    if div.kind == "reverse_kl":
        q = torch.exp(ls)
        s, g = q * (ls - lt), q * (ls - lt + 1.0)
    elif div.kind == "forward_kl":
        p = torch.exp(lt)
        s, g = p * (lt - ls), -p
    else:
        b = div.beta
        lm = torch.logaddexp(ls + math.log1p(-b), lt + math.log(b))
        g = (1.0 - b) * torch.exp(ls) * (ls - lm)
        s = b * torch.exp(lt) * (lt - lm) + g
    if div.term_clip is not None:
        keep = s <= div.term_clip
        s = torch.where(keep, s, torch.full_like(s, div.term_clip))
        g = torch.where(keep, g, torch.zeros_like(g))
    return s, g


def _div_args(div):
    beta = float(div.beta) if div.kind == "jsd" else 0.5
    clip = float(div.term_clip) if div.term_clip is not None else 0.0
    return beta, math.log(beta), math.log1p(-beta), clip


def _pair_launch_common(s_hidden, s_weight, t_hidden, t_weight):
    return (s_hidden.stride(0), s_weight.stride(0), t_hidden.stride(0), t_weight.stride(0))


def _full_support(s_hidden, s_weight, t_hidden, t_weight, logit, div, token_grad):
    N, H = s_hidden.shape
    Ht = t_hidden.shape[1]
    V = s_weight.shape[0]
    dev = s_hidden.device
    cfg = kc.tile_config(min(H, Ht), two_sided=True, dtype=s_hidden.dtype)
    nbv = triton.cdiv(V, cfg["BLOCK_V"])
    (scale, cap, inv_t), has_cap = _logit_args(logit)
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
    # per-tile shift to the row maxes of the relative difference (see kernels/linear_divergence.py)
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

    dx, dw = _grad_from_tiles(s_hidden, s_weight, launch)
    return loss, dx, dw


def _gather_rows(x, w, K, logit):
    """Logits z[n, j] = transform(x_n . w_{K[n, j]}) and the tanh factor, fp32, chunked."""
    N, H = x.shape
    k = K.shape[1]
    z = torch.empty(N, k, dtype=torch.float32, device=x.device)
    th = torch.ones_like(z) if logit.softcap is not None else None
    chunk = max(1, GATHER_ELEMS // max(1, k * H))
    for n0 in range(0, N, chunk):
        n1 = min(N, n0 + chunk)
        wk = w[K[n0:n1]].float()
        r = torch.einsum("ch,ckh->ck", x[n0:n1].float(), wk) * logit.logit_scale
        if logit.softcap is not None:
            t = torch.tanh(r / logit.softcap)
            th[n0:n1] = t
            r = logit.softcap * t
        z[n0:n1] = r / logit.temperature
    return z, th


def _scatter_sparse(x, w, K, dzK, dx, dw):
    """dx[n] += sum_j dzK[n,j] w[K[n,j]];  dw[K[n,j]] += dzK[n,j] x[n]   (chunked, fp32)."""
    N, H = x.shape
    k = K.shape[1]
    chunk = max(1, GATHER_ELEMS // max(1, k * H))
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
    if div.tail == "renorm":
        Ls, Lt = torch.logsumexp(zsK, 1), torch.logsumexp(ztK, 1)
    else:
        ss = _row_stats(s_hidden, s_weight, logit, kset=K if bucket else None)
        st = _row_stats(t_hidden, t_weight, logit, kset=K if bucket else None)
        Ls, Lt = ss.lse, st.lse
    ls, lt = zsK - Ls[:, None], ztK - Lt[:, None]
    s, g = _summand_torch(ls, lt, div)
    loss, G = s.sum(1), g.sum(1)
    if bucket:
        ls_tail = ss.tail_lse - ss.lse
        lt_tail = st.tail_lse - st.lse
        s_t, g_t = _summand_torch(ls_tail, lt_tail, div)
        loss, G = loss + s_t, G + g_t
    if token_grad is None:
        return loss, None, None
    tg = token_grad.float()
    if div.tail == "renorm":
        sparse = tg[:, None] * (g - torch.exp(ls) * G[:, None])
        dx = torch.zeros(N, H, dtype=torch.float32, device=s_hidden.device)
        dw = torch.zeros(V, H, dtype=torch.float32, device=s_hidden.device)
    else:
        sparse = tg[:, None] * g
        tail = None
        if bucket:
            tail = ((tg * g_t).contiguous(), ls_tail.contiguous(), K)
        dx, dw = _dense_grad(s_hidden, s_weight, logit, Ls.contiguous(), (tg * G).contiguous(), tail=tail)
    dzK = sparse / logit.temperature
    if thK is not None:
        dzK = dzK * (1.0 - thK * thK)
    dzK = dzK * logit.logit_scale
    _scatter_sparse(s_hidden, s_weight, K, dzK, dx, dw)
    return loss, dx, dw


def divergence(s_hidden, s_weight, t_hidden, t_weight, logit, div, topk_ids=None, token_grad=None):
    if s_hidden.dtype == torch.float64:
        return _reference().divergence(s_hidden, s_weight, t_hidden, t_weight, logit, div,
                                       topk_ids, token_grad)
    N, H = s_hidden.shape
    if N == 0:
        loss = torch.zeros(0, dtype=torch.float32, device=s_hidden.device)
        if token_grad is None:
            return loss, None, None
        return (loss, torch.zeros(0, H, dtype=torch.float32, device=s_hidden.device),
                torch.zeros(s_weight.shape, dtype=torch.float32, device=s_hidden.device))
    s_weight = _like(s_weight, s_hidden)
    t_hidden = _like(t_hidden, s_hidden)
    t_weight = _like(t_weight, s_hidden)
    if div.support == "teacher_topk":
        return _topk_support(s_hidden, s_weight, t_hidden, t_weight, logit, div, topk_ids, token_grad)
    return _dispatch(lambda: _div_chunked(s_hidden, s_weight, t_hidden, t_weight, logit, div, token_grad),
                     lambda: _full_support(s_hidden, s_weight, t_hidden, t_weight, logit, div, token_grad))
