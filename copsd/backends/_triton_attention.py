"""Triton backend entry points for the cascade-attention ops (kernels in ``copsd_kernels``).

float64 inputs are not a kernel target: they are served by the reference implementation.
"""

from __future__ import annotations

import torch
from copsd_kernels.merge_attention_states import merge_attention_states as _merge_kernel
from copsd_kernels.shared_prefix_attention import shared_prefix_attention as _cascade_kernel

from copsd.backends import _reference_attention as _ref


def merge_attention_states(o_a, lse_a, o_b, lse_b):
    if o_a.dtype == torch.float64 or lse_a.dtype == torch.float64:
        return _ref.merge_attention_states(o_a, lse_a, o_b, lse_b)
    return _merge_kernel(o_a, lse_a, o_b, lse_b)


def shared_prefix_attention(q, k, v, prefix_k, prefix_v, scale, seq_lens):
    if q.dtype == torch.float64:
        return _ref.shared_prefix_attention(q, k, v, prefix_k, prefix_v, scale, seq_lens)
    return _cascade_kernel(q, k, v, prefix_k, prefix_v, scale, seq_lens)
