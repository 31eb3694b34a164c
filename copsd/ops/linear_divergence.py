"""``linear_divergence``: per-token divergence between student and teacher next-token
distributions, each formed from hidden states and an lm_head, without ``[N, V]`` logits."""

from __future__ import annotations

import math
from numbers import Real

import torch

from copsd import backends
from copsd.ops import _validate as V
from copsd.ops._spec import KINDS, REDUCTIONS, SUPPORTS, TAILS, DivergenceSpec
from copsd.ops.linear_logprobs import logit_spec
from copsd.ops.linear_topk import check_k


class _LinearDivergence(torch.autograd.Function):
    """Student-side gradients only; teacher inputs are constants (stop-gradient).

    For ``reduction`` "sum"/"mean" the upstream gradient is a scalar, so the gradient is
    computed during the forward pass and scaled in backward.  For "none" the backward is a
    real recomputation with the per-token upstream gradient.
    """

    @staticmethod
    def forward(ctx, xs, ws, xt, wt, topk_ids, logit, div, reduction, impl):
        n = xs.shape[0]
        ctx.reduction = reduction
        ctx.xs_dtype, ctx.ws_dtype = xs.dtype, ws.dtype
        if reduction == "none":
            loss, _, _ = impl.divergence(xs, ws, xt, wt, logit, div, topk_ids, None)
            ctx.save_for_backward(xs, ws, xt, wt, topk_ids)
            ctx.logit, ctx.div, ctx.impl = logit, div, impl
            return loss
        scale = 1.0 / n if (reduction == "mean" and n > 0) else 1.0
        cd = torch.float64 if xs.dtype == torch.float64 else torch.float32
        tg = torch.full((n,), scale, dtype=cd, device=xs.device)
        loss, dxs, dws = impl.divergence(xs, ws, xt, wt, logit, div, topk_ids, tg)
        ctx.save_for_backward(dxs, dws)
        return loss.sum() * scale

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduction == "none":
            xs, ws, xt, wt, topk_ids = ctx.saved_tensors
            _, dxs, dws = ctx.impl.divergence(xs, ws, xt, wt, ctx.logit, ctx.div, topk_ids, grad.contiguous())
        else:
            dxs, dws = ctx.saved_tensors
            if not bool(grad == 1):  # a plain loss.backward(): skip a full pass over d_weight
                dxs, dws = dxs * grad, dws * grad
        dxs = dxs.to(ctx.xs_dtype) if ctx.needs_input_grad[0] else None
        dws = dws.to(ctx.ws_dtype) if ctx.needs_input_grad[1] else None
        return dxs, dws, None, None, None, None, None, None, None


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


def _topk_ids(topk, support, n, vocab, device):
    if support == "full":
        if topk is not None:
            raise ValueError("topk is only used with support='teacher_topk'; got topk with support='full'")
        return None
    if topk is None:
        raise ValueError("support='teacher_topk' needs topk: an int k or an [N, k] tensor of teacher ids")
    if isinstance(topk, torch.Tensor):
        if topk.dim() != 2:
            raise ValueError(f"topk must be an int or an [N, k] id tensor, got shape {list(topk.shape)}")
        k = check_k(topk.shape[1], vocab, name="topk.shape[1]")
        V.ids_in_range("topk", topk, n, vocab, k=k)
        V.same_device([("teacher_hidden", torch.empty(0, device=device)), ("topk", topk)])
        srt = topk.sort(dim=1).values
        if k > 1 and bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError("topk must hold distinct ids in every row")
        return topk
    return check_k(topk, vocab, name="topk")


def linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, *, kind="reverse_kl",
                      beta=0.5, temperature=1.0, logit_scale=1.0, softcap=None, mask=None, support="full",
                      topk=None, tail="bucket", term_clip=None, reduction="none", backend="auto"):
    """Divergence between student q and teacher p per token (see docs/ops.md for the semantics).

    ``reverse_kl`` = KL(q||p), ``forward_kl`` = KL(p||q), ``jsd`` = beta*KL(p||m) + (1-beta)*KL(q||m)
    with m = (1-beta) q + beta p.  No temperature**2 factor is applied: multiply the result
    yourself if you want Hinton-style gradient scaling.  Masked-out tokens give exactly 0 loss
    and 0 gradient; ``reduction="mean"`` averages over unmasked tokens (0 when there are none).
    Gradients flow to ``student_hidden`` and ``student_weight`` only.
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
    topk = _topk_ids(topk, support, n, vocab, student_hidden.device)
    impl = backends.get("divergence", student_hidden.device, backend)

    xt, wt = teacher_hidden.detach(), teacher_weight.detach()
    xs, ws = student_hidden, student_weight
    idx = None
    if mask is not None and not bool(mask.all()):
        idx = torch.nonzero(mask)[:, 0]
        xs, xt = xs.index_select(0, idx), xt.index_select(0, idx)
        if isinstance(topk, torch.Tensor):
            topk = topk.index_select(0, idx)
    if isinstance(topk, int):
        topk_impl = backends.get("topk", xt.device, backend)
        topk = topk_impl.topk(xt.contiguous(), wt.contiguous(), topk, logit)[0]
    topk_ids = topk.long().contiguous() if topk is not None else None

    out = _LinearDivergence.apply(xs.contiguous(), ws.contiguous(), xt.contiguous(), wt.contiguous(),
                                  topk_ids, logit, div, reduction, impl)
    if reduction == "none" and idx is not None:
        out = torch.zeros(n, dtype=out.dtype, device=out.device).index_copy(0, idx, out)
    return out
