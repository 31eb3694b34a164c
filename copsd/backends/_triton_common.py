"""Plumbing shared by the Triton backend's lm_head ops (one host module per op next to this one:
``_triton_logprobs``, ``_triton_topk``, ``_triton_divergence``; kernels in ``copsd_kernels``, i.e.
``copsd_kernels/``).

Two GPU paths; the op modules take the choice as an explicit ``path`` argument, which dispatch
(``copsd.backends.get``) fills from ``backend="triton:fused"`` / ``"triton:chunked"``, else from the
``COPSD_TRITON_PATH`` override, else ``DEFAULT_PATH``.  Neither path ever holds an ``[N, V]`` tensor:

* ``fused`` (verified on an H200; slower there than ``chunked`` on every op): one Triton program per [BLOCK_N
  x BLOCK_V] logits tile (GEMM mainloop over H, fp32 accumulate) reduces the tile to per-row partial states,
  merged here with a few small torch ops (``row_stats``). Gradients recompute the tiles vocabulary slice by
  vocabulary slice into a bounded ``[N, V_slice]`` workspace (``WORKSPACE_BYTES``), then ``dW[slice] = dZ^T
  X`` and ``dX += dZ W[slice]`` with fp32 accumulation (``grad_from_tiles``, ``dense_grad``).
* ``chunked`` (default; verified on an H200, where it is the faster one: 4 GEMMs per gradient step instead
  of 6 GEMM-equivalents): per token chunk of T rows (all ``[T, V]`` buffers within
  ``CHUNK_BYTES``), cuBLAS computes the raw logits with fp32 output (``mm_f32``), ONE Triton row kernel
  per chunk (``copsd_kernels/linear_rows.py``) reduces every row and writes dZ in the input dtype, then
  dX[chunk] = dZ W and dW += dZ^T X[chunk] with fp32 accumulation (``chunk_grads``).

float64 inputs never reach this code: dispatch serves them with the reference backend (``triton.DTYPES``).
"""

from __future__ import annotations

import os

import torch
import triton

from copsd.backends.triton import DEFAULT_PATH, PATHS, load_kernels

load_kernels()

from copsd_kernels import _common as kc  # noqa: E402
from copsd_kernels import linear_logprobs as klp  # noqa: E402
from copsd_kernels import linear_rows as krow  # noqa: E402

interpreting = kc.interpreting

WORKSPACE_BYTES = 256 << 20  # fused path: gradient workspace [N, V_slice]
GATHER_ELEMS = 1 << 24  # [chunk, k, H] fp32 elements of the top-k support gather
CHUNK_BYTES = 1 << 30  # chunked path: all [T, V] buffers of one token chunk together


def path_from_env():
    """``COPSD_TRITON_PATH`` (fused | chunked | auto, auto = ``DEFAULT_PATH``) or None when unset."""
    raw = os.environ.get("COPSD_TRITON_PATH", "").strip().lower()
    if not raw:
        return None
    if raw not in PATHS + ("auto",):
        raise ValueError(f"COPSD_TRITON_PATH must be one of {list(PATHS + ('auto',))}, got {raw!r}")
    return DEFAULT_PATH if raw == "auto" else raw


def check_path(path):
    """The explicit path argument of the op modules; None means the ``COPSD_TRITON_PATH`` override or
    ``DEFAULT_PATH`` (direct callers; dispatch always passes one)."""
    if path is None:
        return path_from_env() or DEFAULT_PATH
    if path not in PATHS:
        raise ValueError(f"path must be one of {list(PATHS)}, got {path!r}")
    return path


def logit_args(logit):
    softcap = logit.softcap
    return (float(logit.logit_scale), float(softcap) if softcap is not None else 1.0,
            1.0 / float(logit.temperature)), softcap is not None


def like(weight, hidden):
    """tl.dot needs one operand dtype; a weight in another dtype is cast (copy) to the hidden's."""
    return weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)


def num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# ----------------------------------------------------------------------------- fused path: statistics


class Stats:
    lse = entropy = zid = tail_lse = None


def row_stats(hidden, weight, logit, ids=None, kset=None, entropy=False):
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
    (scale, cap, inv_t), has_cap = logit_args(logit)
    upcast, ieee = kc.kernel_flags(hidden)
    klp.row_stats_kernel[klp.grid_tiles(N, V, cfg)](
        hidden, weight, ids if ids is not None else dummy, kset if kset is not None else dummy,
        state, zid, N, V, H, kset.shape[1] if kset is not None else 0,
        hidden.stride(0), weight.stride(0), scale, cap, inv_t,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"],
        HAS_SOFTCAP=has_cap, UPCAST=upcast, IEEE=ieee, ENTROPY=entropy,
        GATHER=ids is not None, EXCLUDE=kset is not None, **kc.launch_kwargs(cfg))
    out = Stats()
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


# ----------------------------------------------------------------------------- fp32-output GEMMs

_OUT_DTYPE = {"ok": None}


def mm_f32(a, b, out):
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


def addmm_f32(out, a, b):
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
        mm_f32(a[r0:r1], b, tmp[: r1 - r0])
        out[r0:r1] += tmp[: r1 - r0]


# ----------------------------------------------------------------------------- fused path: gradients


def _vocab_slices(N, V, elem_bytes, block_v):
    width = max(block_v, WORKSPACE_BYTES // max(1, N * elem_bytes) // block_v * block_v)
    for v0 in range(0, V, width):
        yield v0, min(V, v0 + width), width


def grad_from_tiles(hidden, weight, launch):
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
        mm_f32(dz.t(), hidden, dw[v0:v1])
        if part is None:
            mm_f32(dz, weight[v0:v1], dx)
        else:
            mm_f32(dz, weight[v0:v1], part)
            dx += part
    return dx, dw


def dense_grad(hidden, weight, logit, lse, a, b=None, tail=None, gather=None):
    """Gradient of the dense form dz_j = -q_j (a + b ls_j) + [j not in K] t exp(ls_j - u)
    + [j == id] c  (tail = (t, u, K), gather = (ids, c)); per-row vectors fp32 [N]."""
    N, H = hidden.shape
    cfg = kc.tile_config(H, dtype=hidden.dtype)
    (scale, cap, inv_t), has_cap = logit_args(logit)
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

    return grad_from_tiles(hidden, weight, launch)


# ----------------------------------------------------------------------------- chunked path


def row_cfg():
    if interpreting():
        return 32, {}
    return 2048, dict(num_warps=8)


def chunk_rows(N, V, row_bytes):
    t = max(1, CHUNK_BYTES // max(1, row_bytes))
    if t >= 128:
        t = t // 128 * 128
    return min(N, t)


def grad_dtype(hidden):
    return hidden.dtype if hidden.dtype in (torch.bfloat16, torch.float16) else torch.float32


def chunk_grads(dz, x_chunk, weight, dx_chunk, dw, first):
    mm_f32(dz, weight, dx_chunk)
    if first:
        mm_f32(dz.t(), x_chunk, dw)
    else:
        addmm_f32(dw, dz.t(), x_chunk)


def row_stat_chunks(hidden, weight, logit, lse, ent=None, ids=None, zid=None):
    """Yield ``(n0, n1, z)`` per token chunk after the cuBLAS logits GEMM into an fp32 buffer ``z`` and the row
    kernel's statistics: the LSE into ``lse``, the entropy into ``ent`` and the logit at ``ids`` into ``zid``
    when given."""
    N, V = hidden.shape[0], weight.shape[0]
    T = chunk_rows(N, V, 4 * V)
    z = torch.empty(T, V, dtype=torch.float32, device=hidden.device)
    (scale, cap, inv_t), has_cap = logit_args(logit)
    block, launch = row_cfg()
    for n0 in range(0, N, T):
        n1 = min(N, n0 + T)
        zc = z[: n1 - n0]
        mm_f32(hidden[n0:n1], weight.t(), zc)
        krow.lp_row_kernel[(n1 - n0,)](
            zc, lse if ids is None else ids[n0:n1], lse[n0:n1], lse if ent is None else ent[n0:n1],
            lse if zid is None else zid[n0:n1], V, zc.stride(0), scale, cap, inv_t,
            BLOCK=block, HAS_SOFTCAP=has_cap, ENTROPY=ent is not None, GATHER=ids is not None, **launch)
        yield n0, n1, zc

