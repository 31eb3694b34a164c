"""``linear_topk``: the k most likely ids per token (+ their log-probs and the LSE)."""

from __future__ import annotations

import torch

from copsd import backends
from copsd.ops import _validate as V
from copsd.ops.linear_logprobs import logit_spec


def check_k(k, vocab, name="k"):
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"{name} must be an int in [1, V={vocab}], got {k!r}")
    return k


@torch.no_grad()
def linear_topk(hidden, weight, k, *, temperature=1.0, logit_scale=1.0, softcap=None, backend="auto"):
    """Top-``k`` ids of ``softmax(z)`` per token, descending.

    Returns ``(ids[N, k] int64, logprobs[N, k], lse[N])``; not differentiable.
    """
    V.linear_pair("hidden", hidden, "weight", weight)
    spec = logit_spec(temperature, logit_scale, softcap)
    check_k(k, weight.shape[0])
    impl = backends.get("topk", hidden.device, backend)
    return impl.topk(hidden.contiguous(), weight.contiguous(), k, spec)
