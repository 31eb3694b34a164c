"""Argument checks shared by the public ops.  Every failure is a ValueError naming the argument."""

from __future__ import annotations

import math
from numbers import Real

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name, t, *, ndim=None, dtypes=FLOAT_DTYPES):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    return t


def same_device(pairs):
    (n0, t0), *rest = pairs
    for n, t in rest:
        if t is not None and t.device != t0.device:
            raise ValueError(f"{n} is on {t.device} but {n0} is on {t0.device}; all inputs must share a device")


def positive_finite(name, x):
    if isinstance(x, bool) or not isinstance(x, Real) or not math.isfinite(float(x)) or float(x) <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {x!r}")
    return float(x)


def optional_positive_finite(name, x):
    return None if x is None else positive_finite(name, x)


def choice(name, x, options):
    if x not in options:
        raise ValueError(f"{name} must be one of {options}, got {x!r}")
    return x


def linear_pair(hidden_name, hidden, weight_name, weight):
    tensor(hidden_name, hidden, ndim=2)
    tensor(weight_name, weight, ndim=2)
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{hidden_name} has hidden size {hidden.shape[1]} but {weight_name} "
                         f"has {weight.shape[1]}; expected {weight_name} of shape [V, {hidden.shape[1]}]")
    if weight.shape[0] < 1:
        raise ValueError(f"{weight_name} must have at least one vocabulary row, got shape {tuple(weight.shape)}")
    same_device([(hidden_name, hidden), (weight_name, weight)])


def ids_shape(name, ids, n, k=None):
    """Type and shape of an id tensor (static: also checked while ``torch.compile`` traces)."""
    tensor(name, ids, ndim=1 if k is None else 2, dtypes=(torch.int64, torch.int32))
    want = (n,) if k is None else (n, k)
    if tuple(ids.shape) != want:
        raise ValueError(f"{name} must have shape {list(want)}, got {list(ids.shape)}")


def ids_values(name, ids, vocab):
    """Values of an id tensor (reads the data: checked inside the custom ops, where the data exists)."""
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"{name} must hold token ids in [0, {vocab}), got values in [{lo}, {hi}]")


def ids_in_range(name, ids, n, vocab, k=None):
    ids_shape(name, ids, n, k)
    ids_values(name, ids, vocab)


def backend(b):
    if not isinstance(b, str):
        raise ValueError(f"backend must be a string, got {type(b).__name__}")
    return b


def mask(m, n, device):
    if m is None:
        return None
    tensor("mask", m, ndim=1, dtypes=(torch.bool,))
    if m.shape[0] != n:
        raise ValueError(f"mask must have shape [{n}] (one flag per token), got {list(m.shape)}")
    if m.device != device:
        raise ValueError(f"mask is on {m.device} but the hidden states are on {device}")
    return m
