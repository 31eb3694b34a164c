"""Batched rollouts with the prompt prefilled once and its KV shared by the G samples of that prompt.

The prompts of a batch are left padded and prefilled together (explicit ``position_ids``, so padding never
shifts RoPE positions); the resulting cache is then repeated G times along the batch with the cache's public
``batch_repeat_interleave`` (a copy of the K/V, no recomputation) and the G samples decode together.

Sampling log-probs: for every generated token we return ``log_softmax(logits / temperature)[token]``, the
log-prob under the *untruncated* tempered distribution, even when top-k / top-p restricted the sampling.
This is the quantity a re-scoring forward pass reproduces (and what on-policy objectives compare against
the teacher); the truncated distribution's log-prob would differ by the log of the kept mass.
With ``temperature == 0`` decoding is greedy and the log-probs are those of ``log_softmax(logits)``.

Vision-language models (``vision=``, see `copsd.multimodal`): the prefill runs the model's own forward with
the batch's ``pixel_values`` / ``image_grid_thw`` (the vision tower runs once per batch, never per sample)
and explicit 3-D M-RoPE positions from the model's ``get_rope_index``; every generated token is text, so
its position is the row's largest prompt position + 1, + 1 per step (what HF generation derives from its
"rope deltas"), the same in all three M-RoPE components.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from copsd import _hf
from copsd import multimodal as mm


@dataclass
class Rollouts:
    """Samples of a batch of prompts; sample j belongs to prompt ``prompt_index[j]`` (= j // G)."""

    prompt_index: list[int]
    completion_ids: list[list[int]]   # generated ids, EOS / stop id included when generation stopped on it
    logprobs: list[torch.Tensor]      # fp32 per generated token, see the module docstring
    finish_reason: list[str]          # "stop" (EOS / stop id) or "length"


def _id_set(name: str, value, vocab: int) -> list[int]:
    if value is None:
        return []
    items = [value] if isinstance(value, int) else list(value)
    for x in items:
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < vocab:
            raise ValueError(f"{name}: expected token ids in [0, {vocab}), got {value!r}")
    return items


# Decode with the KV cache's plain layers swapped for preallocated in-place ones (`_in_place_cache`); False
# keeps transformers' own concatenating layers (same tokens and log-probs, slower).
_IN_PLACE_CACHE = True


def _filter_logits(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside the top-k and outside the smallest set holding top_p of the mass."""
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of strictly better tokens
        drop_sorted = mass_before >= top_p      # the first token is always kept (mass_before = 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


class _InPlaceLayer(DynamicLayer):
    """One ``DynamicLayer`` of a KV cache whose keys and values live in buffers preallocated for the whole
    rollout, each new token written in place (``DynamicLayer`` makes new tensors by concatenation at every
    token, a cost that grows with the length, in every layer).

    ``keys`` / ``values`` are views ``[:, :, :length]`` of the buffers, so attention reads exactly the same
    values over exactly the same length as with ``DynamicLayer`` (tokens and log-probs do not change).  Built
    by `_in_place_cache` from a filled layer; ``update`` and the length queries are what the decode loop uses,
    and the methods that would replace ``keys`` / ``values`` by new tensors are refused.
    """

    def __init__(self, layer, capacity: int):
        super().__init__()
        k, v = layer.keys, layer.values
        self._k = k.new_empty(*k.shape[:2], capacity, k.shape[3])
        self._v = v.new_empty(*v.shape[:2], capacity, v.shape[3])
        self._len = k.shape[2]
        self._k[:, :, :self._len] = k
        self._v[:, :, :self._len] = v
        self.keys, self.values = self._k[:, :, :self._len], self._v[:, :, :self._len]
        self.device = layer.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        n = self._len + key_states.shape[-2]
        if n > self._k.shape[2]:
            raise RuntimeError(f"in-place KV cache: {n} positions exceed the {self._k.shape[2]} preallocated")
        self._k[:, :, self._len:n] = key_states
        self._v[:, :, self._len:n] = value_states
        self._len = n
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._len

    def _refuse(self, *args, **kwargs):
        raise NotImplementedError("in-place KV cache layer: only decoding (update) is supported")

    crop = batch_repeat_interleave = batch_select_indices = reorder_cache = reset = offload = _refuse


def _in_place_cache(cache, capacity: int) -> None:
    """Swap every plain ``DynamicLayer`` of ``cache`` (filled by the prefill) for an `_InPlaceLayer` holding
    ``capacity`` positions.  Other layer types (sliding window, quantised, linear attention), offloading
    caches and caches without a ``layers`` list are left as they are: they keep their own update."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or getattr(cache, "offloading", False):
        return
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys is not None \
                and layer.keys.dim() == 4 and layer.values.dim() == 4:
            layers[i] = _InPlaceLayer(layer, capacity)


def _uniforms(n: int, generator, device) -> torch.Tensor:
    """[n, 1] float64 uniforms: from one generator, or ``n / len(generator)`` rows from each of a list
    (rows of prompt i from generator i, so a prompt's draws do not depend on the other prompts)."""
    gens = generator if isinstance(generator, list) else [generator]
    per = n // len(gens)
    parts = []
    for g in gens:
        gen_dev = g.device if g is not None else device
        parts.append(torch.rand(per, 1, generator=g, dtype=torch.float64, device=gen_dev).to(device))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _sample(probs: torch.Tensor, generator) -> torch.Tensor:
    """One draw per row by inverse CDF (one uniform per row; much cheaper than torch.multinomial on CPU).

    A token with zero probability is never drawn: the searched CDF step must rise above the uniform.
    """
    cdf = probs.double().cumsum(-1)
    u = _uniforms(probs.shape[0], generator, probs.device)
    tok = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0]
    return tok.clamp_(max=probs.shape[-1] - 1)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], *, num_generations: int = 1, max_new_tokens: int = 256,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, eos_token_id=None,
             stop_token_ids=None, pad_token_id=None,
             generator: torch.Generator | Sequence[torch.Generator] | None = None, all_done=None,
             vision: Sequence[mm.VisionInputs | None] | None = None) -> Rollouts:
    """Sample ``num_generations`` completions per prompt (token ids in, token ids out).

    ``eos_token_id=None`` uses ``model.generation_config.eos_token_id`` (pass ``[]`` for none); generation
    of a sample stops at an EOS or a ``stop_token_ids`` token (included in the completion, reason
    ``"stop"``) or after ``max_new_tokens`` (reason ``"length"``).  ``temperature=0`` is greedy.
    With a seeded ``generator`` the result is reproducible.  ``generator`` may also be a list with one
    generator per prompt: prompt i's samples then draw only from generator i, so with per-prompt seeds a
    prompt gets the same draws whichever prompts share its batch (the sampled tokens can still differ where
    batching changes the logits in their last bits).  The model's train/eval mode is restored.
    ``all_done``: optional ``f(local_done: bool) -> bool`` deciding when decoding stops (e.g. only once every
    process is done, for a sharded model); samples that finished meanwhile are unchanged.
    ``vision``: for a vision-language model, ``vision[i]`` holds the images of ``prompts[i]`` (or None), whose
    image placeholders must already be expanded as the processor does it (see `copsd.multimodal`).
    """
    _, head = _hf.decoder_and_head(model)
    vocab = head.weight.shape[0]
    device = head.weight.device
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts: expected a non-empty sequence of token-id sequences")
    rows = []
    for i, p in enumerate(prompts):
        p = p.tolist() if isinstance(p, torch.Tensor) else p
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) == 0:
            raise ValueError(f"prompts[{i}]: expected a non-empty sequence of token ids")
        p = [int(x) for x in p]
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"prompts[{i}]: expected token ids in [0, {vocab}), "
                             f"got values in [{min(p)}, {max(p)}]")
        rows.append(p)
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations: expected an int >= 1, got {num_generations!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature: expected a finite number >= 0, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k: expected an int >= 0 (0 = off), got {top_k!r}")
    if isinstance(generator, Sequence) and not isinstance(generator, (str, bytes)):
        generator = list(generator)
        if len(generator) != len(rows) or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(f"generator: expected one torch.Generator per prompt ({len(rows)}), got "
                             f"{[type(g).__name__ for g in generator]}")
        if len(generator) == 1:
            generator = generator[0]
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError("generator: expected a torch.Generator, a list of one per prompt, or None, got "
                         f"{type(generator).__name__}")
    gen_cfg = getattr(model, "generation_config", None)
    if eos_token_id is None and gen_cfg is not None:
        eos_token_id = gen_cfg.eos_token_id
    stops = _id_set("eos_token_id", eos_token_id, vocab) + _id_set("stop_token_ids", stop_token_ids, vocab)
    if pad_token_id is None:
        pad_token_id = getattr(gen_cfg, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = stops[0] if stops else 0
    _id_set("pad_token_id", pad_token_id, vocab)
    parts = mm.vlm_parts(model)
    if vision is not None:
        if isinstance(vision, mm.VisionInputs) or not isinstance(vision, Sequence) or len(vision) != len(rows):
            raise ValueError(f"vision: expected a sequence with one VisionInputs or None per prompt ({len(rows)})")
        vision = list(vision)
    if parts is not None or vision is not None:
        for i, p in enumerate(rows):
            mm.check_vision(f"vision[{i}]", p, vision[i] if vision is not None else None, parts, f"prompts[{i}]")
        if vision is not None and all(v is None for v in vision):
            vision = None
    limit = _hf.max_context(mm.text_config(model))
    longest = max(len(p) for p in rows)
    if limit is not None and longest + max_new_tokens > limit:
        raise ValueError(f"max_new_tokens: prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceed the "
                         f"model's context of {limit} tokens")

    was_training = model.training
    model.eval()
    try:
        return _generate(model, rows, num_generations, max_new_tokens, float(temperature), float(top_p),
                         top_k, stops, int(pad_token_id), generator, device, all_done,
                         parts if vision is not None else None, vision)
    finally:
        model.train(was_training)


def _generate(model, rows, g, max_new, temperature, top_p, top_k, stops, pad, generator, device,
              all_done=None, parts=None, vision=None) -> Rollouts:
    b = len(rows)
    width = max(len(p) for p in rows)
    ids = torch.full((b, width), pad, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.long)
    for i, p in enumerate(rows):  # left padding: the last prompt token of every row is at column width - 1
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    extra = {}
    if vision is None:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        next_pos = torch.tensor([len(p) for p in rows], device=device)
    else:
        positions = mm.rope_positions(parts, ids, mask, vision)  # [3, B, S], no forward
        next_pos = positions.amax(dim=(0, 2)) + 1
        images = mm.concat_vision(vision)
        extra = dict(pixel_values=images.pixel_values.to(device), image_grid_thw=images.image_grid_thw.to(device))
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                **extra)
    cache = _hf.output_cache(out)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        raise ValueError(f"model: {type(model).__name__} returned no KV cache with batch_repeat_interleave")
    # a peft wrapper's forward takes **kwargs: ask the wrapped transformers model for the argument's name
    cache_arg = _hf.cache_kwarg(model.get_base_model() if hasattr(model, "get_base_model") else model)
    logits = out.logits[:, -1].float()
    if g > 1:
        cache.batch_repeat_interleave(g)
        logits = logits.repeat_interleave(g, dim=0)
        mask = mask.repeat_interleave(g, dim=0)
        next_pos = next_pos.repeat_interleave(g)
    n = b * g
    if _IN_PLACE_CACHE:
        _in_place_cache(cache, width + max_new)
    # the attention mask of every step is a view of one buffer (columns past the prompt are 1)
    mask_buf = torch.ones(n, width + max_new, dtype=mask.dtype, device=device)
    mask_buf[:, :width] = mask
    stop_ids = torch.tensor(stops, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    lengths = torch.full((n,), max_new, dtype=torch.long, device=device)
    stopped = torch.zeros(n, dtype=torch.bool, device=device)
    tokens, logps = [], []
    for step in range(max_new):
        if temperature == 0:
            logp = logits.log_softmax(-1)
            tok = logits.argmax(-1)
        else:
            scaled = logits / temperature if temperature != 1.0 else logits  # x / 1 == x exactly
            logp = scaled.log_softmax(-1)
            if top_k == 0 and top_p >= 1.0:
                probs = logp.exp()
            else:
                probs = _filter_logits(scaled, top_k, top_p).softmax(-1)
            tok = _sample(probs, generator)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        tokens.append(tok)
        logps.append(logp.gather(1, tok[:, None])[:, 0])
        hit = torch.isin(tok, stop_ids) & ~done
        lengths = torch.where(hit, torch.full_like(lengths, step + 1), lengths)
        stopped |= hit
        done |= hit
        if step == max_new - 1:
            break
        finished = bool(done.all())
        if all_done(finished) if all_done is not None else finished:
            break
        out = model(input_ids=tok[:, None], attention_mask=mask_buf[:, :width + step + 1],
                    position_ids=next_pos[:, None], use_cache=True, **{cache_arg: cache})
        next_pos = next_pos + 1
        logits = out.logits[:, -1].float()
    tok_mat = torch.stack(tokens, 1).cpu()
    lp_mat = torch.stack(logps, 1).cpu()
    lens = lengths.cpu().tolist()
    reasons = ["stop" if s else "length" for s in stopped.cpu().tolist()]
    return Rollouts(
        prompt_index=[j // g for j in range(n)],
        completion_ids=[tok_mat[j, : lens[j]].tolist() for j in range(n)],
        logprobs=[lp_mat[j, : lens[j]].clone() for j in range(n)],
        finish_reason=reasons,
    )


__all__ = ["Rollouts", "generate"]
