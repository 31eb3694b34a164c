"""CUDA backend entry point for ``merge_attention_states`` (kernel in ``csrc/cuda/merge_attention_states.cu``,
registered as ``torch.ops.copsd_cuda.merge_attention_states`` by the ``copsd._cuda`` extension).  Forward
only; float64 inputs never get here (dispatch serves them with the reference backend)."""

from __future__ import annotations

import torch

import copsd._cuda  # noqa: F401  (registers torch.ops.copsd_cuda.*)


def merge_attention_states(o_a, lse_a, o_b, lse_b):
    return torch.ops.copsd_cuda.merge_attention_states(o_a, lse_a, o_b, lse_b)
