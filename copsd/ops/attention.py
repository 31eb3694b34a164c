"""Cascade (shared-prefix) attention: ``shared_prefix_attention`` and ``merge_attention_states``.

An attention state of a query over a set of keys is ``(o, lse)``: the softmax-weighted value average and
``lse = log sum_j exp(scale * q.k_j)`` (natural log, scale folded in -- flash-attn's convention, not
FlashInfer's base 2).  Layouts follow flash-attn: ``o [B, S, H, D]``, ``lse [B, H, S]``.

Both are ``torch.library`` custom ops (``torch.ops.copsd.merge_attention_states`` /
``shared_prefix_attention``, fake implementations, registered autograd): they work under
``torch.compile(fullgraph=True)``.  The kernel backends (triton, cuda) compute the forward only; gradients come
from explicit backward formulas in the reference backend (``copsd/backends/_reference_attention.py``, pure
PyTorch, chunked), so with ``backend="auto"`` and an input that requires grad the forward runs on the
reference too, and naming a kernel backend for an input that requires grad is an error.  The backward is not
itself differentiable (no double backward).
"""

from __future__ import annotations

import math
import os

import torch

from copsd import backends
from copsd.ops import _validate as V

_HALF_AND_UP = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LSE_DTYPES = (torch.float32, torch.float64)


def _wants_grad(*ts):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _forced_backend():
    return os.environ.get("COPSD_BACKEND", "").strip()


def _pick(op, device, backend, needs_grad, dtypes):
    """The forward function: ``auto`` with an input that requires grad takes the reference (unless
    ``COPSD_BACKEND`` forces a backend); a forward-only kernel backend asked for with grad is an error."""
    if backend == "auto" and needs_grad and _forced_backend() in ("", "auto"):
        return backends.resolve(op, device, "reference")
    impl = backends.resolve(op, device, backend, dtypes)
    if impl.NAME != "reference" and needs_grad:
        raise ValueError(f"backend={backend!r} resolved to {impl.NAME!r}, which computes {op} forward only, "
                         "but an input requires grad; use backend='reference' (or 'auto') to differentiate")
    return impl


def _acc_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- custom ops (torch.library)
#
# The public functions check what they can see without reading data and call the custom ops below, passing
# whether an input requires grad (the implementations run below autograd and cannot see it).  The forward runs
# on the backend dispatch picks; the registered autograd calls a backward op, which always runs on the
# reference backend (explicit formulas in pure PyTorch, any device): the kernel backends are forward only.


@torch.library.custom_op("copsd::merge_attention_states", mutates_args=(), schema=(
    "(Tensor o_a, Tensor lse_a, Tensor o_b, Tensor lse_b, str backend, bool needs_grad) -> (Tensor, Tensor)"))
def _merge_op(o_a, lse_a, o_b, lse_b, backend, needs_grad):
    impl = _pick("merge_attention_states", o_a.device, backend, needs_grad, (o_a.dtype, lse_a.dtype))
    return tuple(t.contiguous() for t in impl(o_a, lse_a, o_b, lse_b))


@_merge_op.register_fake
def _merge_fake(o_a, lse_a, o_b, lse_b, backend, needs_grad):
    return torch.empty_like(o_a), lse_a.new_empty(lse_a.shape, dtype=_acc_dtype(o_a))


@torch.library.custom_op("copsd::merge_attention_states_backward", mutates_args=(), schema=(
    "(Tensor o_a, Tensor lse_a, Tensor o_b, Tensor lse_b, Tensor lse, Tensor g_o, Tensor g_lse) "
    "-> (Tensor, Tensor, Tensor, Tensor)"))
def _merge_backward_op(o_a, lse_a, o_b, lse_b, lse, g_o, g_lse):
    impl = backends.resolve("merge_attention_states_backward", o_a.device, "reference")
    return tuple(t.contiguous() for t in impl(o_a, lse_a, o_b, lse_b, lse, g_o, g_lse))


@_merge_backward_op.register_fake
def _merge_backward_fake(o_a, lse_a, o_b, lse_b, lse, g_o, g_lse):
    return torch.empty_like(o_a), torch.empty_like(lse_a), torch.empty_like(o_b), torch.empty_like(lse_b)


def _merge_setup(ctx, inputs, output):
    o_a, lse_a, o_b, lse_b, _, _ = inputs
    ctx.save_for_backward(o_a, lse_a, o_b, lse_b, output[1])


def _merge_backward(ctx, g_o, g_lse):
    grads = _merge_backward_op(*ctx.saved_tensors, g_o.contiguous(), g_lse.contiguous())
    return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None, None)


_merge_op.register_autograd(_merge_backward, setup_context=_merge_setup)


@torch.library.custom_op("copsd::shared_prefix_attention", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, float scale, Tensor? seq_lens, "
    "str backend, bool needs_grad) -> (Tensor, Tensor)"))
def _spa_op(q, k, v, prefix_k, prefix_v, scale, seq_lens, backend, needs_grad):
    if seq_lens is not None:
        lo, hi = int(seq_lens.min()), int(seq_lens.max())
        if lo < 0 or hi > q.shape[1]:
            raise ValueError(f"seq_lens must hold lengths in [0, S={q.shape[1]}], got values in [{lo}, {hi}]")
    impl = _pick("shared_prefix_attention", q.device, backend, needs_grad, (q.dtype,))
    return tuple(t.contiguous() for t in impl(q, k, v, prefix_k, prefix_v, scale, seq_lens))


@_spa_op.register_fake
def _spa_fake(q, k, v, prefix_k, prefix_v, scale, seq_lens, backend, needs_grad):
    b, s, hq, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, hq, s), dtype=_acc_dtype(q))


@torch.library.custom_op("copsd::shared_prefix_attention_backward", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, float scale, Tensor? seq_lens, Tensor o, "
    "Tensor lse, Tensor g_o, Tensor g_lse) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"))
def _spa_backward_op(q, k, v, prefix_k, prefix_v, scale, seq_lens, o, lse, g_o, g_lse):
    impl = backends.resolve("shared_prefix_attention_backward", q.device, "reference")
    return tuple(t.contiguous() for t in impl(q, k, v, prefix_k, prefix_v, scale, seq_lens, o, lse, g_o, g_lse))


@_spa_backward_op.register_fake
def _spa_backward_fake(q, k, v, prefix_k, prefix_v, scale, seq_lens, o, lse, g_o, g_lse):
    return tuple(torch.empty_like(t) for t in (q, k, v, prefix_k, prefix_v))


def _spa_setup(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, scale, seq_lens, _, _ = inputs
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, seq_lens, *output)
    ctx.scale = scale


def _spa_backward(ctx, g_o, g_lse):
    q, k, v, prefix_k, prefix_v, seq_lens, o, lse = ctx.saved_tensors
    grads = _spa_backward_op(q, k, v, prefix_k, prefix_v, ctx.scale, seq_lens, o, lse, g_o.contiguous(),
                             g_lse.contiguous())
    return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None, None, None, None)


_spa_op.register_autograd(_spa_backward, setup_context=_spa_setup)


def merge_attention_states(o_a, lse_a, o_b, lse_b, *, backend="auto"):
    """Merge two attention states over disjoint key sets.

    ``o_a``/``o_b`` ``[B, S, H, D]`` (same dtype), ``lse_a``/``lse_b`` ``[B, H, S]`` float32 (or float64).
    Returns ``(o [B, S, H, D] in o_a's dtype, lse [B, H, S] float32)`` with
    ``o = (e^{lse_a} o_a + e^{lse_b} o_b) / (e^{lse_a} + e^{lse_b})`` and ``lse = logaddexp(lse_a, lse_b)``.
    A row empty on both sides (``lse_a = lse_b = -inf``) gives ``o = 0``, ``lse = -inf``, never NaN.
    """
    V.tensor("o_a", o_a, ndim=4, dtypes=_HALF_AND_UP)
    V.tensor("o_b", o_b, ndim=4, dtypes=_HALF_AND_UP)
    V.tensor("lse_a", lse_a, ndim=3, dtypes=_LSE_DTYPES)
    V.tensor("lse_b", lse_b, ndim=3, dtypes=_LSE_DTYPES)
    if o_b.shape != o_a.shape:
        raise ValueError(f"o_b must have the shape of o_a {list(o_a.shape)}, got {list(o_b.shape)}")
    if o_b.dtype != o_a.dtype:
        raise ValueError(f"o_b must have o_a's dtype {o_a.dtype}, got {o_b.dtype}")
    b, s, h, _ = o_a.shape
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if tuple(lse.shape) != (b, h, s):
            raise ValueError(f"{name} must have shape [B, H, S] = {[b, h, s]} to match o_a "
                             f"{list(o_a.shape)}, got {list(lse.shape)}")
    if lse_b.dtype != lse_a.dtype:
        raise ValueError(f"lse_b must have lse_a's dtype {lse_a.dtype}, got {lse_b.dtype}")
    V.same_device([("o_a", o_a), ("lse_a", lse_a), ("o_b", o_b), ("lse_b", lse_b)])
    V.backend(backend)
    return _merge_op(o_a.contiguous(), lse_a.contiguous(), o_b.contiguous(), lse_b.contiguous(), backend,
                     _wants_grad(o_a, lse_a, o_b, lse_b))


def shared_prefix_attention(q, k, v, prefix_k, prefix_v, *, scale=None, seq_lens=None, backend="auto"):
    """Attention of every sequence over one shared prefix plus its own tokens (causal), cascade-style.

    ``q [B, S, Hq, D]``; ``k``/``v [B, S, Hkv, D]`` (each sequence's own tokens); ``prefix_k``/``prefix_v``
    ``[P, Hkv, D]`` shared by all B (P may be 0).  ``Hq`` must be a multiple of ``Hkv`` (query head h uses
    KV head ``h // (Hq // Hkv)``).  ``seq_lens [B]`` (integer, values in ``[0, S]``) marks right padding:
    keys at ``s >= seq_lens[b]`` are never attended and padded query rows give ``o = 0``, ``lse = -inf``.
    ``scale`` defaults to ``D ** -0.5``.

    Returns ``(o [B, S, Hq, D] in q's dtype, lse [B, Hq, S] float32)`` (float64 for float64 inputs), natural
    log with the scale folded in.  Query ``s`` of sequence ``b`` attends to all P prefix keys and to keys
    ``0..s`` of its own sequence.
    """
    V.tensor("q", q, ndim=4, dtypes=_HALF_AND_UP)
    V.tensor("k", k, ndim=4, dtypes=_HALF_AND_UP)
    V.tensor("v", v, ndim=4, dtypes=_HALF_AND_UP)
    V.tensor("prefix_k", prefix_k, ndim=3, dtypes=_HALF_AND_UP)
    V.tensor("prefix_v", prefix_v, ndim=3, dtypes=_HALF_AND_UP)
    b, s, hq, d = q.shape
    if b < 1 or s < 1 or hq < 1 or d < 1:
        raise ValueError(f"q must have shape [B, S, Hq, D] with every size >= 1, got {list(q.shape)}")
    if k.shape[0] != b or k.shape[1] != s or k.shape[3] != d or k.shape[2] < 1:
        raise ValueError(f"k must have shape [B, S, Hkv, D] = [{b}, {s}, Hkv, {d}] to match q "
                         f"{list(q.shape)}, got {list(k.shape)}")
    hkv = k.shape[2]
    if hq % hkv != 0:
        raise ValueError(f"q's head count Hq={hq} must be a multiple of k's head count Hkv={hkv}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {list(k.shape)}, got {list(v.shape)}")
    if prefix_k.shape[1] != hkv or prefix_k.shape[2] != d:
        raise ValueError(f"prefix_k must have shape [P, Hkv, D] = [P, {hkv}, {d}], "
                         f"got {list(prefix_k.shape)}")
    if prefix_v.shape != prefix_k.shape:
        raise ValueError(f"prefix_v must have the shape of prefix_k {list(prefix_k.shape)}, "
                         f"got {list(prefix_v.shape)}")
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    V.same_device([("q", q), ("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v),
                   ("seq_lens", seq_lens if isinstance(seq_lens, torch.Tensor) else None)])
    scale = 1.0 / math.sqrt(d) if scale is None else V.positive_finite("scale", scale)
    if seq_lens is not None:
        V.tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int64, torch.int32))
        if seq_lens.shape[0] != b:
            raise ValueError(f"seq_lens must have shape [B] = [{b}], got {list(seq_lens.shape)}")
        seq_lens = seq_lens.contiguous()  # its values are checked inside the custom op (they need the data)
    V.backend(backend)
    return _spa_op(q.contiguous(), k.contiguous(), v.contiguous(), prefix_k.contiguous(), prefix_v.contiguous(),
                   scale, seq_lens, backend, _wants_grad(q, k, v, prefix_k, prefix_v))
