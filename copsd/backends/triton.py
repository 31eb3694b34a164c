"""Triton backend (CUDA GPUs): kernels in the ``copsd_kernels`` package (``kernels/``)."""

import torch

NAME = "triton"


def available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or _interpreting()


def _interpreting():
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(op, device):
    # Under TRITON_INTERPRET=1 the kernels run on CPU tensors (tests only; never auto-picked there).
    return device.type == "cuda" or (_interpreting() and device.type == "cpu")


try:  # linear ops (issue 3)
    from copsd.backends._triton_linear import (  # noqa: F401
        divergence,
        logprobs_backward,
        logprobs_forward,
        logprobs_loss,
        topk,
    )
except ImportError:
    pass

try:  # cascade attention (issue 4)
    from copsd.backends._triton_attention import (  # noqa: F401
        merge_attention_states,
        shared_prefix_attention,
    )
except ImportError:
    pass
