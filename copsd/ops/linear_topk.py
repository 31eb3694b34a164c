"""``linear_topk``: the k most likely ids per token (+ their log-probs and the LSE)."""

from __future__ import annotations

import torch

from copsd import backends
from copsd.ops import _validate as V
from copsd.ops._spec import LogitSpec
from copsd.ops.linear_logprobs import logit_spec


def check_k(k, vocab, name="k"):
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"{name} must be an int in [1, V={vocab}], got {k!r}")
    return k


@torch.library.custom_op("copsd::linear_topk", mutates_args=(), schema=(
    "(Tensor hidden, Tensor weight, int k, float temperature, float logit_scale, float? softcap, str backend) "
    "-> (Tensor, Tensor, Tensor)"))
def _topk_op(hidden, weight, k, temperature, logit_scale, softcap, backend):
    impl = backends.resolve("topk", hidden.device, backend, (hidden.dtype,))
    return tuple(impl(hidden, weight, k, LogitSpec(temperature, logit_scale, softcap)))


@_topk_op.register_fake
def _topk_fake(hidden, weight, k, temperature, logit_scale, softcap, backend):
    n, cd = hidden.shape[0], torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return (hidden.new_empty((n, k), dtype=torch.int64), hidden.new_empty((n, k), dtype=cd),
            hidden.new_empty(n, dtype=cd))


@torch.no_grad()
def linear_topk(hidden, weight, k, *, temperature=1.0, logit_scale=1.0, softcap=None, backend="auto"):
    """Top-``k`` ids of ``softmax(z)`` per token, descending.

    Returns ``(ids[N, k] int64, logprobs[N, k], lse[N])``; not differentiable.  A ``torch.library`` custom
    op (``torch.ops.copsd.linear_topk``): works under ``torch.compile(fullgraph=True)``.
    """
    V.linear_pair("hidden", hidden, "weight", weight)
    spec = logit_spec(temperature, logit_scale, softcap)
    check_k(k, weight.shape[0])
    V.backend(backend)
    return _topk_op(hidden.contiguous(), weight.contiguous(), k, spec.temperature, spec.logit_scale, spec.softcap,
                    backend)
