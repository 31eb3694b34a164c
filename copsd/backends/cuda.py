"""CUDA backend: selection and merge kernels from ``csrc/cuda`` (extension ``copsd._cuda``)."""

import torch

NAME = "cuda"


def available():
    try:
        import copsd._cuda  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def supports(op, device):
    return device.type == "cuda"


try:  # attention-state merge (issue 4)
    from copsd.backends._cuda_attention import merge_attention_states  # noqa: F401
except ImportError:
    pass
