"""Model-facing helpers for vision-language models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL and their kin).

copsd passes prompts and teacher contexts as token-id lists that already hold the expanded image
placeholders (``<|image_pad|>`` repeated once per merged vision token, as the processor writes them), and
each prompt's images as one `VisionInputs` (``pixel_values`` + ``image_grid_thw``, what the processor returns
for that prompt).  These helpers turn that into what the model's language part needs:

* `vision_features` runs the vision tower once over some images (their merged embeddings, plus the
  per-layer "deepstack" features of Qwen3-VL);
* `embed` builds ``inputs_embeds`` for a batch: token embeddings with the vision features scattered over
  the image placeholders of each row's *context* (tokens after the context, e.g. a sampled response, are
  always text, even if a sampled id happens to be the image placeholder);
* `rope_positions` computes the 3-D multimodal RoPE positions (M-RoPE) of full sequences with the
  model's own ``get_rope_index``: a function of the token ids and the image grids only, no forward pass.

Only images are supported: video inputs are rejected with a clear error.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from copsd import _hf

_VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


@dataclass(frozen=True, eq=False)
class VisionInputs:
    """The images of one prompt, as the model's processor returns them.

    ``pixel_values [num_patches, patch_dim]``: the flattened patches of every image of the prompt, in order;
    ``image_grid_thw [num_images, 3]`` int: each image's (temporal, height, width) patch grid, so image k owns
    ``prod(image_grid_thw[k])`` rows of ``pixel_values`` and ``prod(image_grid_thw[k]) / merge**2``
    placeholder tokens in the prompt.  Videos are not supported.
    """

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    _digest: list = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        pv, grid = self.pixel_values, self.image_grid_thw
        if not isinstance(pv, torch.Tensor) or pv.ndim != 2 or not pv.is_floating_point():
            raise ValueError("pixel_values: expected a floating-point tensor [num_patches, patch_dim], got "
                             f"{_describe(pv)}")
        if not isinstance(grid, torch.Tensor):
            grid = torch.as_tensor(grid)
        if grid.ndim == 1 and grid.numel() == 3:
            grid = grid[None]
        if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0 or grid.is_floating_point():
            raise ValueError("image_grid_thw: expected an integer tensor [num_images >= 1, 3], got "
                             f"{_describe(grid)}")
        grid = grid.to(torch.long)
        if bool((grid <= 0).any()):
            raise ValueError(f"image_grid_thw: expected positive grid sizes, got {grid.tolist()}")
        patches = int(grid.prod(-1).sum())
        if patches != pv.shape[0]:
            raise ValueError(f"pixel_values: expected {patches} patch rows (the sum over image_grid_thw of t*h*w), "
                             f"got {pv.shape[0]}")
        object.__setattr__(self, "image_grid_thw", grid)
        object.__setattr__(self, "_digest", [])  # fingerprint(), computed on first use

    @classmethod
    def from_processor_output(cls, output: Any) -> VisionInputs | None:
        """The `VisionInputs` of a processor output for ONE prompt (a dict / ``BatchFeature``), or None
        when it holds no image.  Video fields are rejected."""
        for key in _VIDEO_KEYS:
            if output.get(key) is not None:
                raise ValueError(f"output: holds {key!r}; copsd supports images only, not videos")
        pv = output.get("pixel_values")
        if pv is None:
            return None
        return cls(torch.as_tensor(pv), torch.as_tensor(output["image_grid_thw"]))

    @property
    def num_images(self) -> int:
        return int(self.image_grid_thw.shape[0])

    def tokens_per_image(self, merge_size: int) -> list[int]:
        """Placeholder tokens of each image for a vision tower merging ``merge_size x merge_size`` patches."""
        return (self.image_grid_thw.prod(-1) // (merge_size * merge_size)).tolist()

    def fingerprint(self) -> bytes:
        """A digest of the pixels and grids (two prompts with equal fingerprints have the same images)."""
        if not self._digest:
            h = hashlib.blake2b(digest_size=16)
            h.update(self.image_grid_thw.cpu().numpy().tobytes())
            pv = self.pixel_values.detach().cpu().contiguous()
            h.update(str(pv.dtype).encode())
            h.update(pv.view(torch.uint8).numpy().tobytes() if pv.numel() else b"")
            self._digest.append(h.digest())
        return self._digest[0]

    def to(self, device=None, dtype: torch.dtype | None = None) -> VisionInputs:
        return VisionInputs(self.pixel_values.to(device=device, dtype=dtype), self.image_grid_thw.to(device))


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__


def concat_vision(items: Sequence[VisionInputs | None]) -> VisionInputs | None:
    """All the images of several prompts in order (what a batched model forward takes), or None if none."""
    present = [v for v in items if v is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]
    dtype = present[0].pixel_values.dtype
    return VisionInputs(torch.cat([v.pixel_values.to(dtype) for v in present]),
                        torch.cat([v.image_grid_thw for v in present]))


# --------------------------------------------------------------------------------------------------
# The model side


@dataclass(frozen=True)
class VLMParts:
    """The pieces of a Qwen-VL-like model that copsd drives directly."""

    core: torch.nn.Module            # has .visual, .language_model, .get_rope_index, .get_image_features
    language_model: torch.nn.Module  # decoder over inputs_embeds; last_hidden_state is after the final norm
    head: torch.nn.Module            # lm_head
    image_token_id: int
    video_token_id: int | None
    merge_size: int
    deepstack: bool                  # the language model takes visual_pos_masks / deepstack_visual_embeds


def _find_core(model) -> torch.nn.Module | None:
    for module in model.modules():
        if (hasattr(module, "get_rope_index") and hasattr(module, "language_model")
                and hasattr(module, "visual") and hasattr(module, "get_image_features")):
            return module
    return None


def vlm_parts(model) -> VLMParts | None:
    """The `VLMParts` of ``model`` (also through PEFT / other wrappers), or None for a text-only model."""
    core = _find_core(model)
    if core is None:
        return None
    config = core.config
    image_id = getattr(config, "image_token_id", None)
    if image_id is None:
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"model: expected a vision-language model with an lm_head, got {type(model).__name__}")
    lm = core.language_model
    params = inspect.signature(lm.forward).parameters
    merge = int(getattr(config.vision_config, "spatial_merge_size", 1) or 1)
    video_id = getattr(config, "video_token_id", None)
    return VLMParts(core=core, language_model=lm, head=head, image_token_id=int(image_id),
                    video_token_id=int(video_id) if video_id is not None else None, merge_size=merge,
                    deepstack="deepstack_visual_embeds" in params)


def is_vlm(model) -> bool:
    """Whether ``model`` is a vision-language model copsd can feed images to (Qwen-VL style)."""
    return vlm_parts(model) is not None


def text_config(model):
    """The config holding the language model's sizes (the model's own config for a text model)."""
    config = model.config
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


def language_model_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder whose ``last_hidden_state`` feeds the lm_head (after the final norm) and the lm_head.

    For a VLM this is the language model (it takes ``inputs_embeds`` from `embed`), for a text model what
    ``copsd._hf.decoder_and_head`` returns.
    """
    parts = vlm_parts(model)
    if parts is None:
        return _hf.decoder_and_head(model)
    return parts.language_model, parts.head


# --------------------------------------------------------------------------------------------------
# Checks, positions, embeddings


def check_vision(name: str, ids: Sequence[int], vision: VisionInputs | None, parts: VLMParts | None,
                 where: str = "") -> None:
    """Raise ValueError unless the image placeholders of ``ids`` match ``vision`` run by run.

    Each image must be one contiguous run of ``prod(grid) / merge**2`` placeholder ids (the processor's
    expansion, between ``<|vision_start|>`` and ``<|vision_end|>``); no video placeholder is allowed.
    ``name`` is the argument named in the error (e.g. ``"vision[3]"``), ``where`` the token list's name.
    """
    where = where or "the prompt"
    if parts is None:
        if vision is not None:
            raise ValueError(f"{name}: images were given but the model is not a vision-language model")
        return
    if vision is not None and not isinstance(vision, VisionInputs):
        raise ValueError(f"{name}: expected a copsd.multimodal.VisionInputs or None, got {type(vision).__name__}")
    if parts.video_token_id is not None and parts.video_token_id in ids:
        raise ValueError(f"{where}: holds the video placeholder id {parts.video_token_id}; copsd supports images "
                         "only, not videos")
    runs, n = [], 0
    for t in ids:
        if t == parts.image_token_id:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    if n:
        runs.append(n)
    want = vision.tokens_per_image(parts.merge_size) if vision is not None else []
    if runs != want:
        raise ValueError(f"{name}: {len(want)} image(s) needing {want} placeholder tokens, but {where} holds "
                         f"{len(runs)} run(s) of the image placeholder id {parts.image_token_id} of lengths "
                         f"{runs} (expand the images with the model's processor)")


def token_types(ids: torch.Tensor, image_token_id: int, context_lens: Sequence[int] | None = None) -> torch.Tensor:
    """``mm_token_type_ids`` [B, S] int: 1 at image placeholders inside each row's context, else 0 (text)."""
    types = (ids == image_token_id).to(torch.int32)
    if context_lens is not None:
        cols = torch.arange(ids.shape[1], device=ids.device)
        lens = torch.as_tensor(list(context_lens), device=ids.device)
        types = types * (cols[None, :] < lens[:, None]).to(torch.int32)
    return types


def rope_positions(parts: VLMParts, ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   vision: Sequence[VisionInputs | None], context_lens: Sequence[int] | None = None
                   ) -> torch.Tensor:
    """M-RoPE positions [3, B, S] of a padded batch of full sequences, through the model's ``get_rope_index``.

    ``vision[b]`` are row b's images; image placeholders past ``context_lens[b]`` count as text.  Padding
    (``attention_mask == 0``) gets position 0.  No forward pass is run.
    """
    types = token_types(ids, parts.image_token_id, context_lens)
    allv = concat_vision(list(vision))
    grid = allv.image_grid_thw.to(ids.device) if allv is not None else None
    pos, _ = parts.core.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid,
                                       attention_mask=attention_mask)
    return pos


def vision_features(parts: VLMParts, vision: VisionInputs) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """One vision-tower pass over ``vision``'s images: merged embeddings [N, H] (N placeholder tokens, in
    order) and, for Qwen3-VL-style models, the deepstack features (one [N, H] per language layer fed)."""
    lm_embed = parts.language_model.get_input_embeddings()
    device = lm_embed.weight.device
    out = parts.core.get_image_features(vision.pixel_values.to(device), vision.image_grid_thw.to(device),
                                        return_dict=True)
    pooled = out.pooler_output
    embeds = torch.cat(list(pooled), dim=0) if isinstance(pooled, (list, tuple)) else pooled
    deep = getattr(out, "deepstack_features", None)
    if deep is not None:
        deep = [torch.cat(list(f), dim=0) if isinstance(f, (list, tuple)) else f for f in deep]
    return embeds, deep


def features_per_row(parts: VLMParts, vision: Sequence[VisionInputs | None]) -> list[tuple | None]:
    """`vision_features` of each row's images (None for a row without), from ONE vision-tower pass over
    the distinct ``VisionInputs`` objects (rows holding the same object, e.g. the G samples of a prompt,
    share its features): ``[(embeds [n_b, H], deepstack list | None) | None]``."""
    unique: dict[int, int] = {}
    present = []
    for v in vision:
        if v is not None and id(v) not in unique:
            unique[id(v)] = len(present)
            present.append(v)
    if not present:
        return [None] * len(vision)
    embeds, deep = vision_features(parts, concat_vision(present))
    sizes = [sum(v.tokens_per_image(parts.merge_size)) for v in present]
    rows = embeds.split(sizes)
    deep_rows = [d.split(sizes) for d in deep] if deep else None
    return [None if v is None else
            (rows[unique[id(v)]], [d[unique[id(v)]] for d in deep_rows] if deep_rows else None)
            for v in vision]


def embed(parts: VLMParts, ids: torch.Tensor, features: Sequence[tuple | None],
          context_lens: Sequence[int] | None = None) -> tuple[torch.Tensor, dict]:
    """``inputs_embeds`` [B, S, H] of a padded batch and the extra language-model kwargs (deepstack).

    ``features[b]`` is row b's `vision_features` (or None): its rows replace, in order, the image
    placeholders of row b inside its first ``context_lens[b]`` tokens (all tokens if None).
    """
    emb_layer = parts.language_model.get_input_embeddings()
    embeds = emb_layer(ids)
    mask = token_types(ids, parts.image_token_id, context_lens).bool()
    rows_with = [b for b, f in enumerate(features) if f is not None]
    for b in range(ids.shape[0]):
        if features[b] is None and bool(mask[b].any()):
            raise ValueError(f"row {b}: image placeholders without vision features")
    extra: dict = {}
    if not rows_with:
        return embeds, extra
    keep = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    keep[rows_with] = True
    mask = mask & keep[:, None]
    feats = torch.cat([features[b][0] for b in rows_with]).to(embeds.device, embeds.dtype)
    if int(mask.sum()) != feats.shape[0]:
        raise ValueError(f"image placeholders ({int(mask.sum())}) and vision features ({feats.shape[0]}) differ")
    embeds = embeds.masked_scatter(mask[..., None], feats)
    if parts.deepstack and features[rows_with[0]][1] is not None:
        layers = len(features[rows_with[0]][1])
        extra["visual_pos_masks"] = mask
        extra["deepstack_visual_embeds"] = [
            torch.cat([features[b][1][k] for b in rows_with]).to(embeds.device, embeds.dtype)
            for k in range(layers)]
    return embeds, extra


def hidden_states(model, ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  vision: Sequence[VisionInputs | None], context_lens: Sequence[int] | None = None,
                  parts: VLMParts | None = None) -> torch.Tensor:
    """Final-norm hidden states [B, S, H] of a padded batch through a VLM's language model (autograd on).

    The same forward as the model's own (vision features at the context's image placeholders, Qwen3-VL
    deepstack, M-RoPE positions from ``get_rope_index``) except that tokens past ``context_lens[b]`` are
    always text, so a sampled response that contains the placeholder id is scored as text, as it was
    generated.  Feed the result and the lm_head weight to copsd's fused loss ops.
    """
    parts = parts if parts is not None else vlm_parts(model)
    if parts is None:
        raise ValueError(f"model: expected a vision-language model, got {type(model).__name__}")
    vision = list(vision)
    if len(vision) != ids.shape[0]:
        raise ValueError(f"vision: expected one VisionInputs or None per row ({ids.shape[0]}), got {len(vision)}")
    pos = rope_positions(parts, ids, attention_mask, vision, context_lens)
    embeds, extra = embed(parts, ids, features_per_row(parts, vision), context_lens)
    out = parts.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=pos,
                               use_cache=False, **extra)
    return out.last_hidden_state


__all__ = ["VLMParts", "VisionInputs", "check_vision", "concat_vision", "embed", "features_per_row",
           "hidden_states", "is_vlm",
           "language_model_and_head", "rope_positions", "text_config", "token_types", "vision_features",
           "vlm_parts"]
