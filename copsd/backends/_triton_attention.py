"""Triton host code of the cascade-attention ops (kernels in ``copsd_kernels.merge_attention_states`` and
``copsd_kernels.shared_prefix_attention``, which launch themselves).  Forward only; float64 inputs never get
here (dispatch serves them with the reference backend)."""

from __future__ import annotations

from copsd.backends.triton import load_kernels

load_kernels()

from copsd_kernels.merge_attention_states import merge_attention_states  # noqa: E402,F401
from copsd_kernels.shared_prefix_attention import shared_prefix_attention  # noqa: E402,F401
