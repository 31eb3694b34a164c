"""CUDA backend: selection and merge kernels from ``csrc/cuda`` (extension ``copsd._cuda``).

=========================  =====================  ===============================================
op (kernel-level)          host module            kernel
=========================  =====================  ===============================================
topk                       ``_cuda_topk``         ``csrc/cuda/topk_merge.cu`` (merges per-split candidates)
merge_attention_states     ``_cuda_attention``    ``csrc/cuda/merge_attention_states.cu``
=========================  =====================  ===============================================
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

NAME = "cuda"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # float64 goes to the reference backend

_HOST = {"topk": "_cuda_topk", "merge_attention_states": "_cuda_attention"}


def missing():
    if importlib.util.find_spec("copsd._cuda") is None:
        return "the CUDA extension copsd._cuda is not built (no nvcc at install time)"
    if not torch.cuda.is_available():
        return "no CUDA device"
    importlib.import_module("copsd._cuda")  # raises when the built extension does not load
    return None


def available():
    return missing() is None


def supports(op, device):
    return torch.device(device).type == "cuda"


def __getattr__(op):
    if op in _HOST:
        return getattr(importlib.import_module(f"copsd.backends.{_HOST[op]}"), op)
    raise AttributeError(f"module {__name__!r} has no attribute {op!r}")
