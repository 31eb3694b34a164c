"""Triton backend (CUDA GPUs): host code per op, kernels in the ``copsd_kernels`` package.

=========================  ===========================  ===============================================
op (kernel-level)          host module                  kernels (``copsd_kernels.``)
=========================  ===========================  ===============================================
logprobs_forward/backward  ``_triton_logprobs``         ``linear_logprobs``, ``linear_rows``
logprobs_loss              ``_triton_logprobs``         ``linear_rows`` (chunked path only)
topk                       ``_triton_topk``             ``linear_topk`` (+ ``copsd._cuda`` topk_merge)
divergence                 ``_triton_divergence``       ``linear_divergence``, ``linear_logprobs``, ``linear_rows``
merge_attention_states     ``_triton_attention``        ``merge_attention_states``
shared_prefix_attention    ``_triton_attention``        ``shared_prefix_attention``
=========================  ===========================  ===============================================

Shared GEMM / chunk plumbing of the lm_head ops: ``_triton_common``.  Each host module is imported when its
op is first dispatched, so a broken one fails loudly for its own op and never hides the others.  The lm_head
ops have two paths (``PATHS``), picked by dispatch (``backend="triton:chunked"``, ``COPSD_TRITON_PATH``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch

NAME = "triton"
PATHS = ("fused", "chunked")
# chunked: GPU-verified and the faster path on every lm_head op (H200, bf16, N 8192, H 4096, V 151936, 2026-12-04:
# reverse KL fwd+bwd 76.0 ms against fused 115.8, benchmarks/RESULTS.md)
DEFAULT_PATH = "chunked"
PATH_OPS = ("logprobs_forward", "logprobs_backward", "logprobs_loss", "topk", "divergence")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # float64 goes to the reference backend

_HOST = {
    "logprobs_forward": "_triton_logprobs",
    "logprobs_backward": "_triton_logprobs",
    "logprobs_loss": "_triton_logprobs",
    "topk": "_triton_topk",
    "divergence": "_triton_divergence",
    "merge_attention_states": "_triton_attention",
    "shared_prefix_attention": "_triton_attention",
}


def load_kernels():
    """The ``copsd_kernels`` package; in a source checkout without ``pip install -e .``, <repo>/copsd_kernels
    loaded by path.  Importing the package itself imports no kernel (and not triton)."""
    try:
        import copsd_kernels
    except ModuleNotFoundError as e:
        init = Path(__file__).resolve().parents[2] / "copsd_kernels" / "__init__.py"
        if e.name != "copsd_kernels" or not init.exists():
            raise
        spec = importlib.util.spec_from_file_location(
            "copsd_kernels", init, submodule_search_locations=[str(init.parent)])
        copsd_kernels = importlib.util.module_from_spec(spec)
        sys.modules["copsd_kernels"] = copsd_kernels
        spec.loader.exec_module(copsd_kernels)
    return copsd_kernels


def interpreting():
    """``TRITON_INTERPRET=1``: kernels run in Triton's interpreter on CPU tensors (tests)."""
    return load_kernels().interpreting()


def missing():
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        load_kernels()
    except ModuleNotFoundError as e:
        if e.name != "copsd_kernels":
            raise
        return "the copsd_kernels package is not installed"
    if not (torch.cuda.is_available() or interpreting()):
        return "no CUDA device"
    importlib.import_module("copsd.backends._triton_common")  # raises when a kernel module is broken
    return None


def available():
    return missing() is None


def supports(op, device):
    # Under TRITON_INTERPRET=1 the kernels run on CPU tensors (tests only; never auto-picked there).
    return torch.device(device).type == "cuda" or (interpreting() and torch.device(device).type == "cpu")


def path_from_env():
    from copsd.backends._triton_common import path_from_env

    return path_from_env()


def __getattr__(op):
    if op in _HOST:
        return getattr(importlib.import_module(f"copsd.backends.{_HOST[op]}"), op)
    raise AttributeError(f"module {__name__!r} has no attribute {op!r}")
