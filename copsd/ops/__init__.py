"""Public ops.  See docs/ops.md for the exact semantics."""

from copsd.backends import available_backends
from copsd.ops.linear_divergence import linear_divergence
from copsd.ops.linear_logprobs import linear_logprobs, linear_logprobs_loss
from copsd.ops.linear_topk import linear_topk

try:  # cascade attention (issue 4); written alongside
    from copsd.ops.attention import merge_attention_states, shared_prefix_attention
except ImportError:  # pragma: no cover - only while the module is being written
    pass

__all__ = [
    "available_backends",
    "linear_divergence",
    "linear_logprobs",
    "linear_logprobs_loss",
    "linear_topk",
    "merge_attention_states",
    "shared_prefix_attention",
]
