"""Small Hugging Face helpers shared by the teacher scorer, the rollout engine, tests and benchmarks.

Everything here works from configs: models get random weights, nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import torch

# Architecture name -> (config class name, extra config fields). Sizes are filled in by `tiny_causal_lm`.
_ARCHS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": False}),
    "qwen3": ("Qwen3Config", {"head_dim": None}),
    "gemma2": ("Gemma2Config", {"sliding_window": 4096, "query_pre_attn_scalar": None}),
    "gemma3": ("Gemma3TextConfig", {"sliding_window": 4096, "query_pre_attn_scalar": None}),
}
ARCHITECTURES = tuple(_ARCHS)


def tiny_config(
    arch: str,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 4096,
    **overrides: Any,
):
    """A transformers config of family ``arch`` (one of ``ARCHITECTURES``) with the given sizes."""
    import transformers

    if arch not in _ARCHS:
        raise ValueError(f"arch: expected one of {ARCHITECTURES}, got {arch!r}")
    cls_name, extra = _ARCHS[arch]
    head_dim = hidden_size // num_heads
    fields: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        head_dim=head_dim,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    for key, value in extra.items():
        fields[key] = head_dim if value is None and key in ("head_dim", "query_pre_attn_scalar") else value
    fields.update(overrides)
    return getattr(transformers, cls_name)(**fields)


def tiny_causal_lm(
    arch: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    attn_implementation: str | None = None,
    **config_kwargs: Any,
):
    """A randomly initialised causal LM of family ``arch`` built from `tiny_config` (eval mode)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **config_kwargs)
    if attn_implementation is None:
        # Gemma2's attention logit softcapping is only implemented by the eager path.
        attn_implementation = "eager" if arch == "gemma2" else "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model.to(device).eval()


def decoder_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The base decoder (returns hidden states after the final norm) and the lm_head of a causal LM."""
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or base is model or head is None or not hasattr(head, "weight"):
        raise ValueError(
            "model: expected a Hugging Face causal LM with a base decoder and an lm_head, "
            f"got {type(model).__name__}"
        )
    return base, head


def logit_transform(config) -> tuple[float, float | None]:
    """(logit_scale, softcap) that the model applies between ``hidden @ lm_head.weight.T`` and its logits."""
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite divides
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return scale, (float(softcap) if softcap else None)


def max_context(config) -> int | None:
    """The longest sequence the model's positions support, or None if unbounded/unknown."""
    value = getattr(config, "max_position_embeddings", None)
    if not value and hasattr(config, "get_text_config"):  # a vision-language model: its language model's
        value = getattr(config.get_text_config(), "max_position_embeddings", None)
    return int(value) if value else None


def cache_kwarg(model) -> str:
    """The forward argument taking a KV cache: ``cache`` in recent transformers, else ``past_key_values``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out):
    """The KV cache returned by a causal-LM forward, whatever the transformers version calls it."""
    # ``cache`` first: in transformers 5 ``past_key_values`` is a deprecated alias that logs a warning when read
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)
