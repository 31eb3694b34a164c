"""``linear_logprobs``: log-prob of given ids (+ entropy, + LSE) from hidden states and lm_head."""

from __future__ import annotations

import torch

from copsd import backends
from copsd.ops import _validate as V
from copsd.ops._spec import LogitSpec


def logit_spec(temperature, logit_scale, softcap):
    return LogitSpec(
        temperature=V.positive_finite("temperature", temperature),
        logit_scale=V.positive_finite("logit_scale", logit_scale),
        softcap=V.optional_positive_finite("softcap", softcap),
    )


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ids, spec, impl):
        lp, ent, lse = impl.logprobs_forward(hidden, weight, ids, spec)
        ctx.save_for_backward(hidden, weight, ids, lse, ent)
        ctx.spec, ctx.impl = spec, impl
        return lp, ent, lse

    @staticmethod
    def backward(ctx, g_lp, g_ent, g_lse):
        hidden, weight, ids, lse, ent = ctx.saved_tensors
        dh, dw = ctx.impl.logprobs_backward(hidden, weight, ids, lse, ent, g_lp, g_ent, g_lse, ctx.spec)
        dh = dh.to(hidden.dtype) if ctx.needs_input_grad[0] else None
        dw = dw.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None


def linear_logprobs(hidden, weight, ids, *, temperature=1.0, logit_scale=1.0, softcap=None,
                    return_entropy=False, backend="auto"):
    """Log-probabilities of ``ids`` under ``softmax(z)`` with ``z`` formed from ``hidden @ weight.T``.

    Returns ``(logprobs[N], entropy[N] or None, lse[N])`` in float32 (float64 for float64
    inputs); all three are differentiable with respect to ``hidden`` and ``weight``.  No
    ``[N, V]`` tensor is materialised.
    """
    V.linear_pair("hidden", hidden, "weight", weight)
    spec = logit_spec(temperature, logit_scale, softcap)
    V.ids_in_range("ids", ids, hidden.shape[0], weight.shape[0])
    V.same_device([("hidden", hidden), ("ids", ids)])
    impl = backends.get("logprobs_forward", hidden.device, backend)
    lp, ent, lse = _LinearLogprobs.apply(hidden.contiguous(), weight.contiguous(), ids.long().contiguous(),
                                         spec, impl)
    return lp, (ent if return_entropy else None), lse
