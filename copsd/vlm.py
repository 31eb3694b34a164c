"""Vision-language models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): loading, images, vision inputs of a batch.

Loading
-------
A VLM directory is recognised from its config (a ``vision_config`` and an ``image_token_id``).  Its model is
built with ``AutoModelForImageTextToText`` (the family's ``...ForConditionalGeneration`` class), its text side
with the directory's tokenizer, and its images with the directory's image processor.  In transformers 5
``AutoProcessor`` on a Qwen-VL directory also builds a *video* processor that needs torchvision; where
torchvision is missing (or broken) :func:`load_vision_processor` builds the tokenizer and the image
processor separately and says why in one log line.  Nothing else changes: copsd never uses videos.

Image tokens
------------
The chat template writes one ``<|image_pad|>`` per image (inside ``<|vision_start|> ... <|vision_end|>``);
the processor then repeats it ``t * h * w / merge_size**2`` times, from the image's patch grid
``image_grid_thw``.  :func:`expand_image_tokens` does the same on token ids, so a prompt's ids are exactly
what the processor produces for that text and those images.

Batches
-------
:func:`hidden_states` runs a VLM over a padded batch of ``prompt + response`` rows with each row's images:
the vision tower once per distinct image set, the image features scattered over the prompt's image tokens,
the 3-D rotary positions (M-RoPE) from the model's own ``get_rope_index``, then the language model, whose
final hidden states feed the fused loss ops with the lm_head weight, as for text.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import torch

logger = logging.getLogger("copsd")

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
IMAGE_TOKEN = "<|image_pad|>"
# parameter-name markers of the vision encoder (patch embedding, blocks and the merger into the LM)
VISION_MODULE = "visual"


def is_vlm_config(config) -> bool:
    """True for a vision-language model config (it has a vision tower and an image token)."""
    return getattr(config, "vision_config", None) is not None and getattr(config, "image_token_id", None) is not None


def is_vlm(model) -> bool:
    config = getattr(model, "config", None)
    return config is not None and is_vlm_config(config)


def load_config(path: str, trust_remote_code: bool = False, **kwargs):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)


def is_vlm_path(path: str, trust_remote_code: bool = False) -> bool:
    """Whether the model directory (or cached hub id) ``path`` holds a vision-language model."""
    try:
        return is_vlm_config(load_config(path, trust_remote_code))
    except (OSError, ValueError):
        return False


def load_vlm(path: str, *, trust_remote_code: bool = False, dtype=torch.float32, **kwargs):
    """The image-text-to-text model of ``path`` (the class named by its config)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                       **kwargs)


# --------------------------------------------------------------------------- images

def open_image(image, where: str = "", *, decode: bool = True):
    """A decoded RGB PIL image from a path, a PIL image, or a ``datasets`` image dict (``bytes`` / ``path``);
    ``decode=False``: opened only (its size known from the header, pixels not read)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        raise ValueError("image rows need the 'pillow' package (pip install pillow)") from None
    prefix = f"{where}: " if where else ""
    if isinstance(image, dict):
        if image.get("bytes"):
            import io

            image = io.BytesIO(image["bytes"])
        elif image.get("path"):
            image = image["path"]
        else:
            raise ValueError(f"{prefix}image dict without 'bytes' or 'path'")
    if isinstance(image, Image.Image):
        img = image
    else:
        try:
            img = Image.open(image)
            if not decode:
                return img
            img.load()
        except FileNotFoundError:
            raise ValueError(f"{prefix}image file not found: {image}") from None
        except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"{prefix}unreadable image {image if isinstance(image, str) else '(bytes)'} "
                             f"({type(e).__name__}: {e})") from None
    return img if img.mode == "RGB" else img.convert("RGB")


def expand_image_tokens(ids: Sequence[int], image_token_id: int, counts: Sequence[int]) -> list[int]:
    """``ids`` with its k-th ``image_token_id`` repeated ``counts[k]`` times (the processor's expansion)."""
    found = sum(1 for t in ids if t == image_token_id)
    if found != len(counts):
        raise ValueError(f"the rendered prompt has {found} image placeholder(s) but the row has {len(counts)} "
                         "image(s): every {\"type\": \"image\"} part needs one image and the chat template must "
                         "write one image token per part")
    out: list[int] = []
    k = 0
    for t in ids:
        if t == image_token_id:
            out.extend([image_token_id] * int(counts[k]))
            k += 1
        else:
            out.append(int(t))
    return out


class VisionProcessor:
    """The tokenizer and image processor of a VLM, used together (see the module docstring).

    ``processor``: the full ``AutoProcessor`` when it could be built (None otherwise); the two parts it holds
    are the ones used either way.
    """

    def __init__(self, tokenizer, image_processor, processor=None, source: str = ""):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.processor = processor
        self.source = source
        self.image_token = getattr(processor, "image_token", None) or getattr(tokenizer, "image_token", None) \
            or IMAGE_TOKEN
        tid = tokenizer.convert_tokens_to_ids(self.image_token)
        if tid is None or tid == getattr(tokenizer, "unk_token_id", None):
            raise ValueError(f"tokenizer of {source or 'the model'} has no image token {self.image_token!r}")
        self.image_token_id = int(tid)
        self.merge_size = int(getattr(image_processor, "merge_size", None) or 2)

    def encode(self, images, where: str = ""):
        """``copsd.multimodal.VisionInputs`` of one sequence's images (None for no image)."""
        from copsd.multimodal import VisionInputs

        if not images:
            return None
        pil = [open_image(x, where) for x in images]
        out = self.image_processor(images=pil, return_tensors="pt")
        return VisionInputs(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"].long())

    def count_tokens(self, images, where: str = "") -> list[int]:
        """Image tokens of each image, from its size alone where the image processor can say
        (``get_number_of_image_patches``, the processor's own resize rule), else by processing it."""
        count = getattr(self.image_processor, "get_number_of_image_patches", None)
        if count is not None:
            try:
                out = []
                for x in images:
                    img = open_image(x, where, decode=False)
                    width, height = img.size
                    if img is not x:  # opened here (header only): close its file now, not at garbage collection
                        img.close()
                    out.append(int(count(height, width, {})) // self.merge_size ** 2)
                return out
            except (TypeError, KeyError, AttributeError, NotImplementedError):
                pass  # an image processor with another signature: process the images
        return self.token_counts(self.encode(images, where))

    def token_counts(self, vision) -> list[int]:
        """Image tokens of each image in ``vision`` (``t * h * w / merge_size**2``)."""
        if vision is None:
            return []
        return [int(g.prod()) // self.merge_size ** 2 for g in vision.image_grid_thw]

    def save_pretrained(self, path: str) -> None:
        """The image processor beside the model (the tokenizer, chat template included, is saved on its own: a
        full processor's save would write its own copy of the tokenizer over it)."""
        self.image_processor.save_pretrained(path)


def _chat_template_file(path: str) -> str | None:
    """A chat template stored beside the processor (``chat_template.jinja`` / ``chat_template.json``)."""
    if not os.path.isdir(path):
        return None
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    js = os.path.join(path, "chat_template.json")
    if os.path.isfile(js):
        with open(js, encoding="utf-8") as f:
            value = json.load(f).get("chat_template")
        return value if isinstance(value, str) else None
    return None


def load_vision_processor(path: str, tokenizer=None, *, trust_remote_code: bool = False,
                          key: str = "model_name_or_path", **kwargs) -> VisionProcessor:
    """The full ``AutoProcessor`` of ``path`` where it can be built, else its tokenizer and image processor
    built separately (one log line says why, e.g. no torchvision for the video processor).  ``tokenizer``: an
    already loaded tokenizer of ``path`` to use (its pad token settings kept); ``kwargs`` go to every
    ``from_pretrained`` (e.g. ``local_files_only=True``)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    processor = None
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (ImportError, OSError, ValueError, TypeError, AttributeError) as e:
        # the first sentence (transformers wraps its messages mid-sentence, so not the first line)
        reason = " ".join(str(e).split()).split(". ")[0].rstrip(".") + "." if str(e).strip() else type(e).__name__
        logger.info("%s: the full processor of %s cannot be built (%s: %s); using its tokenizer and image "
                    "processor separately (copsd uses no video processor)", key, path, type(e).__name__, reason)
    if processor is not None and getattr(processor, "image_processor", None) is None:
        processor = None
    try:
        image_processor = processor.image_processor if processor is not None else \
            AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise OSError(f"{key}: {path} is a vision-language model but its image processor cannot be loaded "
                      f"({type(e).__name__}: {e})") from e
    if tokenizer is None:
        tokenizer = processor.tokenizer if processor is not None else \
            AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    if not getattr(tokenizer, "chat_template", None):
        template = getattr(processor, "chat_template", None) or _chat_template_file(path)
        if template:
            tokenizer.chat_template = template
    return VisionProcessor(tokenizer, image_processor, processor, source=path)


# --------------------------------------------------------------------------- batches

def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, visions,
                  context_lens: Sequence[int] | None = None) -> torch.Tensor:
    """Final hidden states ``[B, S, H]`` (what the lm_head consumes) of a VLM over a right-padded batch.

    ``visions[b]``: row b's ``VisionInputs`` or None; one vision-tower pass covers the batch's distinct image
    sets (the G samples of a prompt hold the same object).  ``context_lens[b]``: row b's prompt length; an
    image-token id sampled after it is text, never an image slot.  The 3-D rotary positions come from the
    model's own ``get_rope_index``.  Gradients flow into the vision tower unless it is frozen.  This is
    ``copsd.multimodal.hidden_states``, the forward the rollouts and the teacher scorer are checked against."""
    from copsd import multimodal as mm

    parts = mm.vlm_parts(model)
    if parts is None:
        raise ValueError(f"model: {type(model).__name__} is not a vision-language model")
    hidden = mm.hidden_states(model, input_ids, attention_mask, visions, context_lens, parts=parts)
    if torch.is_grad_enabled() and all(v is None for v in visions):
        # a trainable vision tower unused by this batch (text rows only): a zero term keeps its parameters in
        # the graph, so DDP, which all-reduces every trainable parameter's gradient, sees them used everywhere
        trainable = [p for p in parts.core.visual.parameters() if p.requires_grad]
        if trainable:
            hidden = hidden + 0.0 * sum(p.reshape(-1)[0] for p in trainable)
    return hidden


def freeze_vision_tower(model) -> int:
    """``requires_grad_(False)`` on the vision encoder's parameters; returns how many tensors were frozen."""
    n = 0
    for name, p in model.named_parameters():
        if _in_vision_tower(name):
            p.requires_grad_(False)
            n += 1
    return n


def _in_vision_tower(name: str) -> bool:
    return VISION_MODULE in name.split(".")


# LoRA targets: every linear layer but the vision encoder's (a peft regex, full match on module names)
LANGUAGE_ONLY_EXCLUDE = rf"(.*\.)?{VISION_MODULE}(\..*)?"


__all__ = ["FAMILIES", "VisionProcessor", "expand_image_tokens", "freeze_vision_tower", "is_vlm", "is_vlm_config",
           "is_vlm_path", "load_vision_processor", "load_vlm", "open_image", "hidden_states"]
