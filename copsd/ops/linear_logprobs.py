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


def stat_dtype(t):
    """dtype of the statistics an op returns for input ``t``: float64 for float64, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- custom op (torch.library)
#
# The public function validates what it can see without reading data (types, shapes, devices, options) and calls
# the custom op below; the op reads the data (id ranges), asks dispatch for the backend's function and runs it.
# The fake implementation gives torch.compile the output shapes; the registered autograd calls the backward op.


@torch.library.custom_op("copsd::linear_logprobs", mutates_args=(), schema=(
    "(Tensor hidden, Tensor weight, Tensor ids, float temperature, float logit_scale, float? softcap, "
    "str backend) -> (Tensor, Tensor, Tensor)"))
def _forward_op(hidden, weight, ids, temperature, logit_scale, softcap, backend):
    V.ids_values("ids", ids, weight.shape[0])
    impl = backends.resolve("logprobs_forward", hidden.device, backend, (hidden.dtype,))
    return tuple(impl(hidden, weight, ids, LogitSpec(temperature, logit_scale, softcap)))


@_forward_op.register_fake
def _forward_fake(hidden, weight, ids, temperature, logit_scale, softcap, backend):
    n, cd = hidden.shape[0], stat_dtype(hidden)
    return hidden.new_empty(n, dtype=cd), hidden.new_empty(n, dtype=cd), hidden.new_empty(n, dtype=cd)


@torch.library.custom_op("copsd::linear_logprobs_backward", mutates_args=(), schema=(
    "(Tensor hidden, Tensor weight, Tensor ids, Tensor lse, Tensor entropy, Tensor? g_logprobs, "
    "Tensor? g_entropy, Tensor? g_lse, float temperature, float logit_scale, float? softcap, str backend) "
    "-> (Tensor, Tensor)"))
def _backward_op(hidden, weight, ids, lse, entropy, g_logprobs, g_entropy, g_lse, temperature, logit_scale,
                 softcap, backend):
    impl = backends.resolve("logprobs_backward", hidden.device, backend, (hidden.dtype,))
    dh, dw = impl(hidden, weight, ids, lse, entropy, g_logprobs, g_entropy, g_lse,
                  LogitSpec(temperature, logit_scale, softcap))
    return dh.to(hidden.dtype), dw.to(weight.dtype)


@_backward_op.register_fake
def _backward_fake(hidden, weight, ids, lse, entropy, g_logprobs, g_entropy, g_lse, temperature, logit_scale,
                   softcap, backend):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    hidden, weight, ids, *options = inputs
    _, ent, lse = output
    ctx.save_for_backward(hidden, weight, ids, lse, ent)
    ctx.options = options
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no work for it in backward


def _backward(ctx, g_lp, g_ent, g_lse):
    hidden, weight, ids, lse, ent = ctx.saved_tensors
    dh, dw = _backward_op(hidden, weight, ids, lse, ent, g_lp, g_ent, g_lse, *ctx.options)
    return (dh if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None,
            None, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def linear_logprobs(hidden, weight, ids, *, temperature=1.0, logit_scale=1.0, softcap=None,
                    return_entropy=False, backend="auto"):
    """Log-probabilities of ``ids`` under ``softmax(z)`` with ``z`` formed from ``hidden @ weight.T``.

    Returns ``(logprobs[N], entropy[N] or None, lse[N])`` in float32 (float64 for float64
    inputs); all three are differentiable with respect to ``hidden`` and ``weight``.  No
    ``[N, V]`` tensor is materialised.  A ``torch.library`` custom op (``torch.ops.copsd.linear_logprobs``):
    works under ``torch.compile(fullgraph=True)``.
    """
    V.linear_pair("hidden", hidden, "weight", weight)
    spec = logit_spec(temperature, logit_scale, softcap)
    V.ids_shape("ids", ids, hidden.shape[0])
    V.same_device([("hidden", hidden), ("ids", ids)])
    V.backend(backend)
    lp, ent, lse = _forward_op(hidden.contiguous(), weight.contiguous(), ids.long().contiguous(),
                               spec.temperature, spec.logit_scale, spec.softcap, backend)
    return lp, (ent if return_entropy else None), lse


# ----------------------------------------------------------------------------- per-token loss, gradient in forward


class _Coefficients:
    """Calls ``loss_fn`` on each token chunk and returns d loss / d logprobs and d loss / d entropy.

    The chunk's log-probs and entropies are fresh leaves; ``loss_fn`` may use other tensors only as constants:
    a graph reaching any other tensor that requires grad is an error (its gradient would be lost)."""

    def __init__(self, loss_fn):
        self.loss_fn = loss_fn
        self.total = torch.zeros((), dtype=torch.float64)

    def __call__(self, r0, rows, lp, ent, grad=True):
        r0, rows = int(r0), int(rows)
        lp = lp.detach().clone().requires_grad_(grad)
        ent = ent.detach().clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            per = self.loss_fn(lp, ent, slice(r0, r0 + rows))
        if not isinstance(per, torch.Tensor) or per.shape != (rows,) or not per.is_floating_point():
            got = f"{tuple(per.shape)} {per.dtype}" if isinstance(per, torch.Tensor) else type(per).__name__
            raise ValueError(f"loss_fn: expected a floating [{rows}] tensor of per-token losses for rows "
                             f"[{r0}, {r0 + rows}), got {got}")
        self.total = self.total + per.detach().double().sum()  # a 0-dim start combines with any device
        if not (grad and per.requires_grad):
            return None, None
        _check_leaves(per, (lp, ent))
        with torch.enable_grad():
            g_lp, g_ent = torch.autograd.grad(per.sum(), (lp, ent), allow_unused=True)
        return g_lp, g_ent


def _check_leaves(out, allowed):
    """Raise if ``out``'s graph reaches a tensor that requires grad other than ``allowed``."""
    ids = {id(t) for t in allowed}
    seen, stack = set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None and id(var) not in ids:
            raise ValueError("loss_fn: the loss depends on a tensor that requires grad other than the log-probs "
                             f"and entropies (shape {tuple(var.shape)}); its gradient would be lost: pass it "
                             "detached, or use linear_logprobs")
        stack.extend(f for f, _ in fn.next_functions)


class _LinearLogprobsLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ids, spec, impl, coeff):
        fused = impl.other("logprobs_loss")
        out = fused(hidden, weight, ids, spec, coeff) if fused is not None else None
        if out is None:  # forward, the loss's coefficients, recomputing backward
            lp, ent, lse = impl(hidden, weight, ids, spec)
            g_lp, g_ent = coeff(0, hidden.shape[0], lp, ent)
            dx, dw = impl.other("logprobs_backward")(hidden, weight, ids, lse, ent, g_lp, g_ent, None, spec)
        else:
            lp, ent, dx, dw = out
        ctx.save_for_backward(dx, dw)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(lp, ent)
        return coeff.total.to(device=hidden.device, dtype=lp.dtype), lp, ent

    @staticmethod
    def backward(ctx, g, _g_lp, _g_ent):
        dx, dw = ctx.saved_tensors
        if not (g.numel() == 1 and float(g) == 1.0):
            dx, dw = dx * g.to(dx.dtype), dw * g.to(dw.dtype)
        dh = dx.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        dW = dw.to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return dh, dW, None, None, None, None


def linear_logprobs_loss(hidden, weight, ids, loss_fn, *, temperature=1.0, logit_scale=1.0, softcap=None,
                         backend="auto"):
    """A scalar loss ``sum_t loss_fn(logprobs, entropy, rows)[t]`` of the per-token log-probs of ``ids`` and the
    token entropies, with its gradient computed in the forward pass.

    ``loss_fn(logprobs[T], entropy[T], rows)`` is called once per token chunk (rows ``rows``, a ``slice`` into
    the N tokens, in order) and returns the chunk's per-token losses ``[T]``; slice any per-token side input
    (advantages, old log-probs, masks, weights) with ``rows``.  It must be elementwise over tokens.  Other
    tensors it uses are constants: a loss reaching another tensor that requires grad raises ``ValueError``.

    Returns ``(loss, logprobs[N], entropy[N])``: the loss (float32, float64 for float64 inputs) is
    differentiable with respect to ``hidden`` and ``weight`` (the stored gradient is scaled by the upstream
    gradient in backward); the log-probs and entropies are detached, for logging.  On the C++ CPU backend and
    the Triton ``chunked`` path each chunk's logits are kept between the statistics and the gradient: three
    lm_head-sized GEMMs instead of the four of ``linear_logprobs`` forward + backward.

    Not a custom op: ``loss_fn`` is arbitrary Python, called between the kernels of each token chunk, and a
    ``torch.library`` op cannot take a callable.  Under ``torch.compile`` (``torch.compiler.is_compiling()``)
    this function instead returns ``linear_logprobs`` + ``loss_fn`` over all N rows at once (one call,
    ``rows = slice(0, N)``), which compiles with ``fullgraph=True`` and gives the same loss and gradients,
    at the cost of the fourth GEMM; there the gradient also reaches other tensors ``loss_fn`` uses (no
    ``ValueError``).
    """
    V.linear_pair("hidden", hidden, "weight", weight)
    spec = logit_spec(temperature, logit_scale, softcap)
    V.ids_shape("ids", ids, hidden.shape[0])
    V.same_device([("hidden", hidden), ("ids", ids)])
    if not callable(loss_fn):
        raise ValueError(f"loss_fn: expected a callable (logprobs, entropy, rows) -> [T] losses, got "
                         f"{type(loss_fn).__name__}")
    if torch.compiler.is_compiling():
        return _loss_unfused(hidden, weight, ids, loss_fn, spec, backend)
    V.ids_values("ids", ids, weight.shape[0])
    impl = backends.resolve("logprobs_forward", hidden.device, backend, (hidden.dtype,))
    coeff = _Coefficients(loss_fn)
    args = (hidden.contiguous(), weight.contiguous(), ids.long().contiguous(), spec)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        # no gradient wanted (evaluation): the statistics and the loss only
        with torch.no_grad():
            lp, ent, _ = impl(*args)
            coeff(0, hidden.shape[0], lp, ent, grad=False)
        return coeff.total.to(device=hidden.device, dtype=lp.dtype), lp, ent
    return _LinearLogprobsLoss.apply(*args, impl, coeff)


def _loss_unfused(hidden, weight, ids, loss_fn, spec, backend):
    """``linear_logprobs_loss`` as plain differentiable ops (what runs under ``torch.compile``)."""
    n = hidden.shape[0]
    lp, ent, _ = linear_logprobs(hidden, weight, ids, temperature=spec.temperature, logit_scale=spec.logit_scale,
                                 softcap=spec.softcap, return_entropy=True, backend=backend)
    per = loss_fn(lp, ent, slice(0, n))
    if not isinstance(per, torch.Tensor) or per.shape != (n,) or not per.is_floating_point():
        got = f"{tuple(per.shape)} {per.dtype}" if isinstance(per, torch.Tensor) else type(per).__name__
        raise ValueError(f"loss_fn: expected a floating [{n}] tensor of per-token losses for rows [0, {n}), "
                         f"got {got}")
    return per.sum(dtype=torch.float64).to(lp.dtype), lp.detach(), ent.detach()
