"""``linear_divergence``: per-token divergence between student and teacher next-token
distributions, each formed from hidden states and an lm_head, without ``[N, V]`` logits."""

from __future__ import annotations

import math
from numbers import Real
from typing import NamedTuple

import torch

from copsd import backends
from copsd.ops import _validate as V
from copsd.ops._spec import KINDS, REDUCTIONS, SUPPORTS, TAILS, DivergenceSpec, LogitSpec
from copsd.ops.linear_logprobs import logit_spec, stat_dtype
from copsd.ops.linear_topk import check_k

_OPTIONS = ("float temperature, float logit_scale, float? softcap, str kind, float beta, str support, str tail, "
            "float? term_clip, str backend")
_INPUTS = "Tensor student_hidden, Tensor student_weight, Tensor teacher_hidden, Tensor teacher_weight, Tensor? mask"


class DivergenceStats(NamedTuple):
    """Token statistics ``linear_divergence(..., stats_ids=ids)`` returns next to the loss: detached ``[N]``
    tensors under the divergence's logit transform, over the full vocabulary whatever the support (0 on
    masked tokens)."""

    student_logprobs: torch.Tensor  # log q(ids[n])
    student_entropy: torch.Tensor  # -sum_v q_v log q_v
    teacher_logprobs: torch.Tensor  # log p(ids[n])


# ----------------------------------------------------------------------------- custom ops (torch.library)
#
# The public function validates what it can see without reading data and calls one of two custom ops:
#   copsd::linear_divergence          per-token losses (reduction "none"; teacher top-k ids it computed from an
#                                     int ``topk`` are a second output, kept for the backward op)
#   copsd::linear_divergence_reduced  "sum" / "mean", with the student gradient computed in the same pass when
#                                     it is wanted (scaled by the upstream gradient in backward)
# Masked tokens are removed inside the ops (a data-dependent shape) and get zero loss and zero gradient.
# Both take ``stats_ids`` (None: no statistics) and return the token statistics as one more output, a [3, N]
# tensor (student log-prob, student entropy, teacher log-prob; empty without stats_ids).


def _specs(temperature, logit_scale, softcap, kind, beta, support, tail, term_clip):
    return (LogitSpec(temperature, logit_scale, softcap),
            DivergenceSpec(kind=kind, beta=beta, support=support, tail=tail, term_clip=term_clip))


def _compact(mask, *tensors):
    """Rows of ``tensors`` where ``mask`` is set (and their index), or the tensors themselves."""
    if mask is None or bool(mask.all()):
        return None, tensors
    idx = torch.nonzero(mask)[:, 0]
    return idx, tuple(None if t is None else t.index_select(0, idx) for t in tensors)


def _expand(idx, rows, n, dim=0):
    """Scatter compacted ``rows`` (along ``dim``) back into ``n`` rows (zeros where masked)."""
    if idx is None:
        return rows
    shape = list(rows.shape)
    shape[dim] = n
    return rows.new_zeros(shape).index_copy(dim, idx, rows)


def _no_stats(xs):
    return torch.zeros(0, dtype=stat_dtype(xs), device=xs.device)


def _teacher_ids(xt, wt, topk_ids, topk_k, logit, div, backend):
    """The teacher-top-k support of the (compacted) rows: given ids (checked) or the teacher's top k."""
    if div.support != "teacher_topk":
        return None
    if topk_ids is None:
        impl = backends.resolve("topk", xt.device, backend, (xt.dtype,))
        return impl(xt, wt, topk_k, logit)[0].long().contiguous()
    return topk_ids.long().contiguous()


def _check_topk_values(topk_ids, vocab):
    if topk_ids is None:
        return
    V.ids_values("topk", topk_ids, vocab)
    if topk_ids.shape[1] > 1:
        srt = topk_ids.sort(dim=1).values
        if bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError("topk must hold distinct ids in every row")


def _stats_unfused(xs, ws, xt, wt, stats_ids, logit, backend):
    """The token statistics from the backend's ``logprobs_forward`` on each side (two more lm_head GEMMs): for
    backends whose divergence kernel does not produce them itself."""
    f = backends.resolve("logprobs_forward", xs.device, backend, (xs.dtype,))
    s_lp, s_ent, _ = f(xs, ws, stats_ids, logit)
    f = backends.resolve("logprobs_forward", xt.device, backend, (xt.dtype,))
    t_lp = f(xt, wt, stats_ids, logit)[0]
    cd = stat_dtype(xs)
    return torch.stack([s_lp.to(cd), s_ent.to(cd), t_lp.to(cd)])


def _run(xs, ws, xt, wt, mask, topk_ids, topk_k, options, token_grad=None, per_token_grad=None, stats_ids=None):
    """Compact, pick the backend, run; returns (loss[n], dxs[n] | None, dws | None, ids[n] | None, idx,
    stats[3, n] | None)."""
    *spec_args, backend = options
    logit, div = _specs(*spec_args)
    idx, (xs_c, xt_c, ids_c, g_c, sid_c) = _compact(mask, xs, xt, topk_ids, per_token_grad, stats_ids)
    if sid_c is not None:
        V.ids_values("stats_ids", sid_c, ws.shape[0])  # masked tokens' ids are never read
        sid_c = sid_c.long().contiguous()
    impl = backends.resolve("divergence", xs.device, backend, (xs.dtype,))
    if token_grad is not None:
        g_c = torch.full((xs_c.shape[0],), token_grad, dtype=stat_dtype(xs), device=xs.device)
    g_c = None if g_c is None else g_c.contiguous()
    select = impl.other("divergence_select") if (div.support == "teacher_topk" and ids_c is None) else None
    if select is not None:  # the backend selects the teacher's top k from the logits its divergence forms
        loss, dxs, dws, stats, ids_c = select(xs_c, ws, xt_c, wt, logit, div, topk_k, g_c, sid_c)
        return loss, dxs, dws, ids_c, idx, stats
    ids_c = _teacher_ids(xt_c, wt, ids_c, topk_k, logit, div, backend)
    fused = None if sid_c is None else impl.other("divergence_stats")
    if fused is not None:
        loss, dxs, dws, stats = fused(xs_c, ws, xt_c, wt, logit, div, ids_c, g_c, sid_c)
    else:
        loss, dxs, dws = impl(xs_c, ws, xt_c, wt, logit, div, ids_c, g_c)
        stats = None if sid_c is None else _stats_unfused(xs_c, ws, xt_c, wt, sid_c, logit, backend)
    return loss, dxs, dws, ids_c, idx, stats


@torch.library.custom_op("copsd::linear_divergence", mutates_args=(), schema=(
    f"({_INPUTS}, Tensor? topk_ids, int topk_k, Tensor? stats_ids, {_OPTIONS}) -> (Tensor, Tensor, Tensor)"))
def _per_token_op(xs, ws, xt, wt, mask, topk_ids, topk_k, stats_ids, *options):
    _check_topk_values(topk_ids, ws.shape[0])
    loss, _, _, ids, idx, stats = _run(xs, ws, xt, wt, mask, topk_ids, topk_k, options, stats_ids=stats_ids)
    n = xs.shape[0]
    if ids is None or topk_ids is not None:  # only ids it computed are returned (never an input)
        ids = torch.zeros(0, 0, dtype=torch.int64, device=xs.device)
    else:
        ids = _expand(idx, ids, n)
    stats = _no_stats(xs) if stats is None else _expand(idx, stats, n, dim=1)
    return _expand(idx, loss, n), ids, stats


def _stats_fake(xs, stats_ids):
    return xs.new_empty((3, xs.shape[0]) if stats_ids is not None else (0,), dtype=stat_dtype(xs))


@_per_token_op.register_fake
def _per_token_fake(xs, ws, xt, wt, mask, topk_ids, topk_k, stats_ids, temperature, logit_scale, softcap, kind,
                    beta, support, tail, term_clip, backend):
    n = xs.shape[0]
    k = topk_k if (topk_ids is None and support == "teacher_topk") else 0
    ids = xs.new_empty((n, k) if k else (0, 0), dtype=torch.int64)
    return xs.new_empty(n, dtype=stat_dtype(xs)), ids, _stats_fake(xs, stats_ids)


@torch.library.custom_op("copsd::linear_divergence_backward", mutates_args=(), schema=(
    f"({_INPUTS}, Tensor? topk_ids, Tensor grad, {_OPTIONS}) -> (Tensor, Tensor)"))
def _per_token_backward_op(xs, ws, xt, wt, mask, topk_ids, grad, *options):
    _, dxs, dws, _, idx, _ = _run(xs, ws, xt, wt, mask, topk_ids, 0, options, per_token_grad=grad)
    return _expand(idx, dxs, xs.shape[0]).to(xs.dtype), dws.to(ws.dtype)


@_per_token_backward_op.register_fake
def _per_token_backward_fake(xs, ws, xt, wt, mask, topk_ids, grad, *options):
    return torch.empty_like(xs), torch.empty_like(ws)


def _per_token_setup(ctx, inputs, output):
    xs, ws, xt, wt, mask, topk_ids, topk_k, stats_ids, *options = inputs
    computed = topk_ids is None and options[5] == "teacher_topk"  # options[5]: support
    ctx.save_for_backward(xs, ws, xt, wt, mask, output[1] if computed else topk_ids)
    ctx.options = options
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)  # see _reduced_setup


def _per_token_backward(ctx, grad, _g_ids, _g_stats):
    if grad is None:  # the losses do not reach what is differentiated (only the ids / statistics did)
        return (None,) * (len(ctx.options) + 8)
    xs, ws, xt, wt, mask, ids = ctx.saved_tensors
    dxs, dws = _per_token_backward_op(xs, ws, xt, wt, mask, ids, grad.contiguous(), *ctx.options)
    return (dxs if ctx.needs_input_grad[0] else None, dws if ctx.needs_input_grad[1] else None,
            *([None] * (len(ctx.options) + 6)))


_per_token_op.register_autograd(_per_token_backward, setup_context=_per_token_setup)


@torch.library.custom_op("copsd::linear_divergence_reduced", mutates_args=(), schema=(
    f"({_INPUTS}, Tensor? topk_ids, int topk_k, Tensor? stats_ids, str reduction, bool with_grad, {_OPTIONS}) "
    "-> (Tensor, Tensor, Tensor, Tensor)"))
def _reduced_op(xs, ws, xt, wt, mask, topk_ids, topk_k, stats_ids, reduction, with_grad, *options):
    _check_topk_values(topk_ids, ws.shape[0])
    n = xs.shape[0] if mask is None else int(mask.sum())
    scale = 1.0 / n if (reduction == "mean" and n > 0) else 1.0
    loss, dxs, dws, _, idx, stats = _run(xs, ws, xt, wt, mask, topk_ids, topk_k, options,
                                         token_grad=scale if with_grad else None, stats_ids=stats_ids)
    stats = _no_stats(xs) if stats is None else _expand(idx, stats, xs.shape[0], dim=1)
    if not with_grad:
        empty = torch.zeros(0, dtype=loss.dtype, device=xs.device)
        return loss.sum() * scale, empty, empty.clone(), stats
    return loss.sum() * scale, _expand(idx, dxs, xs.shape[0]), dws, stats


@_reduced_op.register_fake
def _reduced_fake(xs, ws, xt, wt, mask, topk_ids, topk_k, stats_ids, reduction, with_grad, *options):
    cd = stat_dtype(xs)
    stats = _stats_fake(xs, stats_ids)
    if not with_grad:
        return xs.new_empty((), dtype=cd), xs.new_empty(0, dtype=cd), xs.new_empty(0, dtype=cd), stats
    return xs.new_empty((), dtype=cd), xs.new_empty(xs.shape, dtype=cd), xs.new_empty(ws.shape, dtype=cd), stats


def _reduced_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(output[3])
    # Outputs nothing differentiates (the saved gradients, the statistics) would otherwise get zero-filled
    # upstream gradients: a [V, H] fill (and, on fresh memory, its page faults) per backward for nothing.
    ctx.set_materialize_grads(False)


def _reduced_backward(ctx, grad, _g_dxs, _g_dws, _g_stats):
    if grad is None:  # only the saved gradients / statistics were differentiated: nothing reaches the inputs
        return (None,) * ctx.n_inputs
    dxs, dws = ctx.saved_tensors
    if dxs.dim() == 1:
        raise RuntimeError("copsd::linear_divergence_reduced ran with with_grad=False: it has no gradient "
                           "(linear_divergence passes with_grad=True whenever a student input requires grad)")
    # A plain loss.backward() (gradient 1) skips a pass over dW.  A traced gradient (torch.compile, export,
    # opcheck) is a tensor subclass without data to compare: always scaled.
    if type(grad) is not torch.Tensor or not bool(grad == 1):
        dxs, dws = dxs * grad, dws * grad
    return (dxs.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None,
            dws.to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None, *([None] * (ctx.n_inputs - 2)))


_reduced_op.register_autograd(_reduced_backward, setup_context=_reduced_setup)


def _divergence_spec(kind, beta, support, tail, term_clip):
    V.choice("kind", kind, KINDS)
    V.choice("support", support, SUPPORTS)
    V.choice("tail", tail, TAILS)
    if kind == "jsd":
        if isinstance(beta, bool) or not isinstance(beta, Real) or not 0.0 < float(beta) < 1.0:
            raise ValueError(f"beta must be a number in (0, 1) for kind='jsd', got {beta!r} "
                             "(use kind='forward_kl' or 'reverse_kl' for the end points)")
    if term_clip is not None and (isinstance(term_clip, bool) or not isinstance(term_clip, Real)
                                  or not math.isfinite(float(term_clip))):
        raise ValueError(f"term_clip must be None or a finite number, got {term_clip!r}")
    return DivergenceSpec(kind=kind, beta=float(beta), support=support, tail=tail,
                          term_clip=None if term_clip is None else float(term_clip))


def _topk_arg(topk, support, n, vocab):
    """``(ids tensor | None, k)`` from the ``topk`` argument (static checks; values are checked in the op)."""
    if support == "full":
        if topk is not None:
            raise ValueError("topk is only used with support='teacher_topk'; got topk with support='full'")
        return None, 0
    if topk is None:
        raise ValueError("support='teacher_topk' needs topk: an int k or an [N, k] tensor of teacher ids")
    if isinstance(topk, torch.Tensor):
        if topk.dim() != 2:
            raise ValueError(f"topk must be an int or an [N, k] id tensor, got shape {list(topk.shape)}")
        k = check_k(topk.shape[1], vocab, name="topk.shape[1]")
        V.ids_shape("topk", topk, n, k=k)
        return topk.long().contiguous(), k
    return None, check_k(topk, vocab, name="topk")


def linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, *, kind="reverse_kl",
                      beta=0.5, temperature=1.0, logit_scale=1.0, softcap=None, mask=None, support="full",
                      topk=None, tail="bucket", term_clip=None, reduction="none", stats_ids=None, backend="auto"):
    """Divergence between student q and teacher p per token (see docs/ops.md for the semantics).

    ``reverse_kl`` = KL(q||p), ``forward_kl`` = KL(p||q), ``jsd`` = beta*KL(p||m) + (1-beta)*KL(q||m)
    with m = (1-beta) q + beta p.  No temperature**2 factor is applied: multiply the result
    yourself if you want Hinton-style gradient scaling.  Masked-out tokens give exactly 0 loss
    and 0 gradient; ``reduction="mean"`` averages over unmasked tokens (0 when there are none).
    Gradients flow to ``student_hidden`` and ``student_weight`` only.  ``torch.library`` custom ops
    (``torch.ops.copsd.linear_divergence`` / ``linear_divergence_reduced``): works under
    ``torch.compile(fullgraph=True)``.

    ``stats_ids`` (integer ``[N]``, e.g. the sampled tokens): the call returns ``(loss, stats)`` with ``stats`` a
    :class:`DivergenceStats` of detached ``[N]`` tensors -- the student's log-prob of ``stats_ids`` and entropy
    and the teacher's log-prob of ``stats_ids``, full-vocabulary softmax under the same logit transform, 0 on
    masked tokens (whose ids are not read) -- computed from the logits the divergence forms anyway.  On the
    ``cpu`` and ``reference`` backends that costs no extra lm_head GEMM; on ``triton`` / ``cuda`` the op runs the
    backend's log-probs kernel on each side (same numbers, two more GEMMs).
    """
    V.linear_pair("student_hidden", student_hidden, "student_weight", student_weight)
    V.linear_pair("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight)
    n, vocab = student_hidden.shape[0], student_weight.shape[0]
    if teacher_hidden.shape[0] != n:
        raise ValueError(f"teacher_hidden must have {n} rows (one per student token), got {teacher_hidden.shape[0]}")
    if teacher_weight.shape[0] != vocab:
        raise ValueError(f"teacher_weight has vocabulary {teacher_weight.shape[0]} but student_weight has {vocab}; "
                         "student and teacher must share the vocabulary")
    V.same_device([("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden)])
    logit = logit_spec(temperature, logit_scale, softcap)
    div = _divergence_spec(kind, beta, support, tail, term_clip)
    V.choice("reduction", reduction, REDUCTIONS)
    mask = V.mask(mask, n, student_hidden.device)
    topk_ids, topk_k = _topk_arg(topk, support, n, vocab)
    if topk_ids is not None:
        V.same_device([("teacher_hidden", teacher_hidden), ("topk", topk_ids)])
    if stats_ids is not None:
        V.ids_shape("stats_ids", stats_ids, n)
        V.same_device([("student_hidden", student_hidden), ("stats_ids", stats_ids)])
        stats_ids = stats_ids.long().contiguous()
    V.backend(backend)
    tensors = (student_hidden.contiguous(), student_weight.contiguous(), teacher_hidden.detach().contiguous(),
               teacher_weight.detach().contiguous(), mask)
    options = (logit.temperature, logit.logit_scale, logit.softcap, div.kind, div.beta, div.support, div.tail,
               div.term_clip, backend)
    if reduction == "none":
        out = _per_token_op(*tensors, topk_ids, topk_k, stats_ids, *options)
        loss, stats = out[0], out[2]
    else:
        with_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or student_weight.requires_grad)
        out = _reduced_op(*tensors, topk_ids, topk_k, stats_ids, reduction, with_grad, *options)
        loss, stats = out[0], out[3]
    if stats_ids is None:
        return loss
    stats = stats.detach()
    return loss, DivergenceStats(stats[0], stats[1], stats[2])
