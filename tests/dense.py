"""The dense references now live in ``copsd.reference`` (shared by the tests and the benchmarks); this name
is kept for test modules that still ``import dense``."""

from copsd.reference import (  # noqa: F401
    attention,
    divergence,
    divergence_grads,
    logits,
    logprobs,
    logprobs_grads,
    merge_attention_states,
    terms,
    topk,
)
