"""Public ops.  Exact semantics: docs/ops.md; where each layer lives: docs/architecture.md."""

from copsd.backends import available_backends
from copsd.ops.attention import merge_attention_states, shared_prefix_attention
from copsd.ops.linear_divergence import DivergenceStats, linear_divergence
from copsd.ops.linear_logprobs import linear_logprobs, linear_logprobs_loss
from copsd.ops.linear_topk import linear_topk

__all__ = [
    "DivergenceStats",
    "available_backends",
    "linear_divergence",
    "linear_logprobs",
    "linear_logprobs_loss",
    "linear_topk",
    "merge_attention_states",
    "shared_prefix_attention",
]
