"""CUDA backend entry point for ``merge_attention_states`` (kernel in ``csrc/cuda/merge_attention_states.cu``,
registered as ``torch.ops.copsd_cuda.merge_attention_states`` by the ``copsd._cuda`` extension).

float64 inputs are not a kernel target: they are served by the reference implementation.
"""

from __future__ import annotations

import torch

import copsd._cuda  # noqa: F401  (registers torch.ops.copsd_cuda.*; ImportError where not built)
from copsd.backends import _reference_attention as _ref


def merge_attention_states(o_a, lse_a, o_b, lse_b):
    if o_a.dtype == torch.float64 or lse_a.dtype == torch.float64:
        return _ref.merge_attention_states(o_a, lse_a, o_b, lse_b)
    return torch.ops.copsd_cuda.merge_attention_states(o_a, lse_a, o_b, lse_b)
