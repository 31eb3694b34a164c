"""Backend registry and dispatch.

A backend is a module in this package exposing::

    NAME: str
    def missing() -> str | None             # why it is not usable here (None: usable); raises when it is
                                            # built but broken (a failed import of its extension or kernels)
    def available() -> bool                 # missing() is None
    def supports(op: str, device) -> bool   # can run `op` on tensors of this device
    DTYPES: tuple                           # optional: input dtypes its kernels take; others go to reference
    PATHS, DEFAULT_PATH, PATH_OPS           # optional: variants of the kernels of the ops in PATH_OPS,
                                            # chosen with backend="name:path"

and, for each op it implements, the kernel-level function below (with a ``path=`` keyword when the backend
has PATHS).  ``resolve`` is what the public ops call: it picks the backend (``get``), sends dtypes the backend
has no kernels for to the reference backend, and binds the path, so the op layer holds one callable.  Inputs are already
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
``divergence_stats(s_hidden, s_weight, t_hidden, t_weight, logit, div, topk_ids, token_grad, stats_ids[N] int64)``
    -> ``(loss[N], d_s_hidden | None, d_s_weight | None, stats[3, N])``  (optional)
    ``divergence`` plus, from the same logits, the student's log-prob of ``stats_ids`` and entropy and the
    teacher's log-prob of ``stats_ids`` (rows of ``stats``).  A backend without it gets them from its
    ``logprobs_forward`` on each side (``linear_divergence(..., stats_ids=)``).
``divergence_select(s_hidden, s_weight, t_hidden, t_weight, logit, div, k: int, token_grad[N] | None,
                    stats_ids[N] int64 | None)``
    -> ``(loss[N], d_s_hidden | None, d_s_weight | None, stats[3, N] | None, ids[N, k] int64)``  (optional)
    For ``div.support == "teacher_topk"`` with no ids given: the backend selects each row's teacher top ``k``
    itself (the ids ``topk`` returns) from the teacher logits its divergence forms, and returns them.  A backend
    without it gets them from its ``topk`` first (one more pass over the teacher's lm_head).
``merge_attention_states(o_a, lse_a, o_b, lse_b)`` -> ``(o, lse)``
``shared_prefix_attention(q, k, v, prefix_k, prefix_v, scale: float, seq_lens|None)`` -> ``(o, lse)``
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

# Preference order for backend="auto", per device type.
_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}
_ALL = ("reference", "cpu", "triton", "cuda")
_cache: dict = {}
_warned: set = set()


class BackendError(RuntimeError):
    """A backend that is built here failed to load (its import or its extension is broken)."""


def _module(name):
    if name not in _cache:
        _cache[name] = importlib.import_module(f"copsd.backends.{name}")
    return _cache[name]


def _status(name):
    """``(module | None, reason it is unusable | None, broken)``; never raises."""
    try:
        mod = _module(name)
        return mod, mod.missing(), False
    except Exception as e:  # noqa: BLE001 - reported, and raised by dispatch where it would be used
        return None, f"{type(e).__name__}: {e}", True


class Backends(list):
    """The usable backend names; ``missing`` maps every other backend to the reason it is not usable."""

    missing: dict


def available_backends():
    """Names of the backends that are built and usable on this machine, in a list whose ``missing``
    attribute says, for each other backend, why not (not built, no CUDA device, or the import error)."""
    out = Backends()
    out.missing = {}
    for name in _ALL:
        _, reason, _ = _status(name)
        if reason is None:
            out.append(name)
        else:
            out.missing[name] = reason
    return out


def _split(backend, source):
    """``"triton:chunked"`` -> ("triton", "chunked"); ``"cpu"`` -> ("cpu", None)."""
    if not isinstance(backend, str):
        raise ValueError(f"{source} must be a string, got {type(backend).__name__}")
    name, _, path = backend.strip().partition(":")
    return name, (path or None)


def get(op: str, device: torch.device, backend: str = "auto"):
    """Return the backend module that runs ``op`` on ``device`` (``backend`` may name a path: "triton:chunked")."""
    name, _ = _split(backend, "backend")
    if name == "auto":
        forced = os.environ.get("COPSD_BACKEND", "").strip()
        if forced and forced != "auto":
            return _explicit(_split(forced, "COPSD_BACKEND")[0], op, device, source="COPSD_BACKEND")
        return _auto(op, torch.device(device))
    return _explicit(name, op, device, source="backend")


def _auto(op, device):
    skipped = []
    for name in _ORDER.get(device.type, ("reference",)):
        mod, reason, broken = _status(name)
        if broken:
            raise BackendError(f"backend {name!r} is built but failed to load ({reason}); fix the installation "
                               f"or pass backend='reference' (or set COPSD_BACKEND) to run without it")
        if reason is None and hasattr(mod, op) and mod.supports(op, device):
            if name == "reference" and device.type == "cuda" and skipped:
                key = (op, tuple(skipped))
                if key not in _warned:
                    _warned.add(key)
                    warnings.warn(f"copsd: {op} on a CUDA device runs on the pure-PyTorch reference backend "
                                  f"(slow): {'; '.join(skipped)}", RuntimeWarning, stacklevel=3)
            return mod
        skipped.append(f"{name}: {reason or f'no {op} for {device.type} tensors'}")
    return _module("reference")


def _explicit(name, op, device, source):
    if name not in _ALL:
        raise ValueError(f"{source} must be 'auto' or one of {list(_ALL)}, got {name!r}")
    mod, reason, _ = _status(name)
    if reason is not None:
        raise ValueError(f"{source}={name!r} is not usable here ({reason}); "
                         f"available backends: {available_backends()}")
    if not hasattr(mod, op) or not mod.supports(op, device):
        raise ValueError(f"{source}={name!r} does not implement {op} on {device.type} tensors; "
                         f"available backends: {available_backends()}")
    return mod


def _path(mod, backend, op):
    """The variant of ``mod``'s kernels: from ``backend="name:path"`` (or ``COPSD_BACKEND`` for "auto"), else
    the module's environment override (``path_from_env``: ``COPSD_TRITON_PATH``), else its ``DEFAULT_PATH``."""
    name, path = _split(backend, "backend")
    if name == "auto":
        path = _split(os.environ.get("COPSD_BACKEND", "") or "auto", "COPSD_BACKEND")[1]
    paths = getattr(mod, "PATHS", None)
    if paths and op not in mod.PATH_OPS:
        return None
    if not paths:
        if path is not None:
            raise ValueError(f"backend {mod.NAME!r} has no paths to choose from, got {path!r}")
        return None
    if path is None:
        path = mod.path_from_env() or mod.DEFAULT_PATH
    if path not in paths:
        raise ValueError(f"backend {mod.NAME!r} path must be one of {list(paths)}, got {path!r}")
    return path


class Kernel:
    """One kernel-level function of the backend dispatch chose, with its path bound; ``NAME`` is the
    backend that runs it (``reference`` for a dtype the chosen backend has no kernels for)."""

    def __init__(self, mod, op, path):
        self.NAME, self.path, self._mod = mod.NAME, path, mod
        fn = getattr(mod, op)
        self._fn = fn if path is None else functools.partial(fn, path=path)

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def other(self, op):
        """The same backend's (and path's) function for another op, or None where it has none."""
        if not hasattr(self._mod, op):
            return None
        return Kernel(self._mod, op, self.path if op in getattr(self._mod, "PATH_OPS", ()) else None)


def resolve(op: str, device, backend: str = "auto", dtypes=()):
    """The function that runs ``op`` (a kernel-level name, see above) for tensors on ``device`` with input
    ``dtypes``: ``get``'s backend, or the reference backend for a dtype it has no kernels for (float64 on the
    GPU backends: accuracy checks, not a kernel target); its path bound as ``_path`` says."""
    device = torch.device(device)
    mod = get(op, device, backend)
    kernel_dtypes = getattr(mod, "DTYPES", None)
    if kernel_dtypes is not None and any(d not in kernel_dtypes for d in dtypes):
        return Kernel(_module("reference"), op, None)
    return Kernel(mod, op, _path(mod, backend, op))
