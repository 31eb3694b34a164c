"""Backend registry and dispatch.

A backend is a module in this package exposing::

    NAME: str
    def available() -> bool                 # built and usable on this machine
    def supports(op: str, device) -> bool   # can run `op` on tensors of this device

and, for each op it implements, the kernel-level function below.  Inputs are already
validated, contiguous, on one device; masked tokens were removed by the public op.  All
statistics are returned in float32 (float64 when the inputs are float64).

``logprobs_forward(hidden[N,H], weight[V,H], ids[N] int64, logit: LogitSpec)``
    -> ``(logprobs[N], entropy[N], lse[N])``
``logprobs_backward(hidden, weight, ids, lse, entropy, g_logprobs|None, g_entropy|None, g_lse|None, logit)``
    -> ``(d_hidden[N,H], d_weight[V,H])``  (d_weight accumulated in fp32)
``topk(hidden, weight, k: int, logit)``
    -> ``(ids[N,k] int64, logprobs[N,k], lse[N])``  descending
``divergence(s_hidden, s_weight, t_hidden, t_weight, logit, div: DivergenceSpec,
             topk_ids[N,k] int64 | None, token_grad[N] | None)``
    -> ``(loss[N], d_s_hidden | None, d_s_weight | None)``
    ``token_grad`` is dLoss_total/dloss_n; when given, gradients w.r.t. the student
    are returned (teacher inputs are constants).  ``topk_ids`` is given iff
    ``div.support == "teacher_topk"`` (distinct ids per row).
``merge_attention_states(o_a, lse_a, o_b, lse_b)`` -> ``(o, lse)``
``shared_prefix_attention(q, k, v, prefix_k, prefix_v, scale: float, seq_lens|None)`` -> ``(o, lse)``
"""

from __future__ import annotations

import importlib
import os

import torch

# Preference order for backend="auto", per device type.
_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}
_ALL = ("reference", "cpu", "triton", "cuda")
_cache: dict = {}


def _module(name):
    if name not in _cache:
        try:
            _cache[name] = importlib.import_module(f"copsd.backends.{name}")
        except ImportError:
            _cache[name] = None
    return _cache[name]


def _usable(name):
    mod = _module(name)
    try:
        return mod is not None and bool(mod.available())
    except Exception:  # a broken optional backend must not break the reference path
        return False


def available_backends():
    """Names of the backends that are built and usable on this machine."""
    return [n for n in _ALL if _usable(n)]


def get(op: str, device: torch.device, backend: str = "auto"):
    """Return the backend module that runs ``op`` on ``device``."""
    if not isinstance(backend, str):
        raise ValueError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        forced = os.environ.get("COPSD_BACKEND", "").strip()
        if forced and forced != "auto":
            return _explicit(forced, op, device, source="COPSD_BACKEND")
        for name in _ORDER.get(device.type, ("reference",)):
            if _usable(name):
                mod = _module(name)
                if hasattr(mod, op) and mod.supports(op, device):
                    return mod
        return _module("reference")
    return _explicit(backend, op, device, source="backend")


def _explicit(name, op, device, source):
    if name not in _ALL:
        raise ValueError(f"{source} must be 'auto' or one of {list(_ALL)}, got {name!r}")
    if not _usable(name):
        raise ValueError(f"{source}={name!r} is not built or not usable here; "
                         f"available backends: {available_backends()}")
    mod = _module(name)
    if not hasattr(mod, op) or not mod.supports(op, device):
        raise ValueError(f"{source}={name!r} does not implement {op} on {device.type} tensors; "
                         f"available backends: {available_backends()}")
    return mod
