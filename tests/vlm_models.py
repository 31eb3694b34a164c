"""Tiny vision-language models for CPU tests, built offline (nothing is downloaded).

API (everything seeded and deterministic):

``FAMILIES``                      ``("qwen2_vl", "qwen2_5_vl", "qwen3_vl")``
``tiny_vlm(family, seed=0, ...)`` a random-weight fp32 ``*ForConditionalGeneration`` in eval mode: 2 text layers
                                  (hidden 64, 4 heads, 2 KV heads, head_dim 16, M-RoPE sections summing to 8),
                                  a 2-block vision tower (width 32), untied lm_head by default; its vocabulary
                                  covers ``vlm_tokenizer()`` and the special-token ids are set from it.
``vlm_tokenizer()``               a byte-level BPE (``tokenizers``, trained here on ``CORPUS``) with the Qwen-VL
                                  special tokens (``SPECIAL``) and ``CHAT_TEMPLATE`` (ChatML, content parts).
``image_processor(family)``       the family's image processor from its defaults (the PIL one, no torchvision),
                                  with ``min_pixels``/``max_pixels`` small: an image gives 4..16 vision tokens.
``vlm_processor(family)``         the real ``Qwen2VLProcessor`` (Qwen2/2.5-VL) or ``Qwen3VLProcessor`` built
                                  from the tokenizer and the image processor, without a video processor.
``synthetic_image(seed, size)``   a PIL RGB image of random-ish colour blocks; ``size = (width, height)``.
``encode(processor, messages, images, add_generation_prompt=True)``
                                  the processor's output for one conversation: ``{"input_ids": list[int],
                                  "pixel_values": Tensor | None, "image_grid_thw": Tensor | None}`` (image pads
                                  already expanded, as the model expects them).
``save_vlm_dir(path, family, seed=0, tie_word_embeddings=False)``
                                  ``save_pretrained`` of model + tokenizer + image processor + processor (chat
                                  template included) into ``path``; returns ``path``.

The chat template renders ``{"type": "image"}`` parts as ``<|vision_start|><|image_pad|><|vision_end|>`` and
``{"type": "text"}`` parts as their text, like the real Qwen-VL templates (without their default system turn).
"""

from __future__ import annotations

import os

import torch

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "You are a helpful assistant. Be helpful and honest; refuse to help anyone hurt a person.",
    "Describe the image. A red square on a blue background, with a small green circle.",
    "What is in this picture? A cat sits on a chair next to the window.",
    "How do I hurt someone with this? I can't help with hurting people.",
    "Count the shapes in the image: there are three shapes, two squares and a circle.",
    "Read the sign in the photo. The sign says: keep out, danger, high voltage.",
]

VOCAB_SIZE = 448  # >= the tokenizer's vocabulary (400 BPE entries incl. the specials)

# family -> (config class, model class, processor class, vision patch size)
_FAMILY = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", 14),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2VLProcessor", 14),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", 16),
}
MERGE = 2


def _check(family: str) -> None:
    if family not in _FAMILY:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")


def vlm_tokenizer():
    """Byte-level BPE over ``CORPUS`` with the Qwen-VL special tokens and ``CHAT_TEMPLATE``."""
    from transformers import PreTrainedTokenizerFast
    from user_models import train_byte_level_bpe

    tok = train_byte_level_bpe(CORPUS, SPECIAL)
    t = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                extra_special_tokens=SPECIAL[1:2] + SPECIAL[3:])
    t.chat_template = CHAT_TEMPLATE
    return t


def _token_ids(tokenizer) -> dict:
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL}
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "bos_token_id": ids["<|endoftext|>"],
    }


def tiny_vlm_config(family: str, *, tie_word_embeddings: bool = False, num_layers: int = 2,
                    max_position_embeddings: int = 2048, initializer_range: float = 0.02,
                    text_overrides: dict | None = None):
    """The config of `tiny_vlm` (see the module docstring)."""
    import transformers

    _check(family)
    cfg_name, _, _, patch = _FAMILY[family]
    ids = _token_ids(vlm_tokenizer())
    hidden, heads, kv, head_dim = 64, 4, 2, 16
    text = dict(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=128, num_hidden_layers=num_layers,
                num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max_position_embeddings,
                rms_norm_eps=1e-6, tie_word_embeddings=tie_word_embeddings, initializer_range=initializer_range,
                eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"],
                bos_token_id=ids["bos_token_id"])
    if family == "qwen3_vl":
        text.update(head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                        "mrope_section": [3, 3, 2], "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch,
                      spatial_merge_size=MERGE, temporal_patch_size=2, out_hidden_size=hidden,
                      num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
    else:
        text.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
        if family == "qwen2_vl":
            vision = dict(depth=2, embed_dim=32, hidden_size=hidden, mlp_ratio=2, num_heads=2, patch_size=patch,
                          spatial_merge_size=MERGE, temporal_patch_size=2)
        else:
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch,
                          spatial_merge_size=MERGE, temporal_patch_size=2, out_hidden_size=hidden,
                          window_size=2 * patch * MERGE, fullatt_block_indexes=[1])
    text.update(text_overrides or {})
    top = {k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    return getattr(transformers, cfg_name)(text_config=text, vision_config=vision,
                                           tie_word_embeddings=tie_word_embeddings,
                                           initializer_range=initializer_range, **top)


def tiny_vlm(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, tie_word_embeddings: bool = False,
             num_layers: int = 2, attn_implementation: str = "sdpa", max_position_embeddings: int = 2048,
             initializer_range: float = 0.02, text_overrides: dict | None = None):
    """A random-weight tiny ``family`` VLM (eval mode); see the module docstring.  A larger
    ``initializer_range`` (e.g. 0.2) spreads the logits, so greedy decoding has no near-ties;
    ``text_overrides`` are extra text-config fields (e.g. a sliding window)."""
    import transformers

    config = tiny_vlm_config(family, tie_word_embeddings=tie_word_embeddings, num_layers=num_layers,
                             max_position_embeddings=max_position_embeddings, initializer_range=initializer_range,
                             text_overrides=text_overrides)
    cls = getattr(transformers, _FAMILY[family][1])
    torch.manual_seed(seed)
    model = cls._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return model.eval()


def image_processor(family: str):
    """The family's image processor from its defaults (PIL backend), sized for tiny images."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    _check(family)
    patch = _FAMILY[family][3]
    unit = patch * MERGE
    kw = dict(patch_size=patch, merge_size=MERGE, temporal_patch_size=2,
              size={"shortest_edge": 4 * unit * unit, "longest_edge": 16 * unit * unit})
    if family == "qwen3_vl":
        kw.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return Qwen2VLImageProcessorPil(**kw)


def _image_only(cls):
    """A subclass of the real processor class whose sub-processors are the image processor and the tokenizer.

    transformers 5.24 checks every sub-processor's class, ``video_processor=None`` included, and the video
    processor base class needs torchvision; the attributes come from ``__init__``'s parameters, so dropping
    ``video_processor`` there is enough.  Everything else (``__call__``, the chat template, the image-token
    expansion) is the real class's code.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": __name__,
                                       "__doc__": f"{cls.__name__} without a video processor (tests)."})


def vlm_processor(family: str, tokenizer=None):
    """The real Qwen-VL processor class, with no video processor (see `_image_only`; needs no torchvision)."""
    import transformers

    _check(family)
    cls = _image_only(getattr(transformers, _FAMILY[family][2]))
    tokenizer = tokenizer if tokenizer is not None else vlm_tokenizer()
    return cls(image_processor=image_processor(family), tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def synthetic_image(seed: int = 0, size: tuple[int, int] = (64, 64)):
    """A deterministic RGB image of coloured blocks (PIL)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    w, h = size
    blocks = torch.randint(0, 256, (3, (h + 7) // 8, (w + 7) // 8), generator=g, dtype=torch.uint8)
    arr = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, :h, :w].permute(1, 2, 0).contiguous()
    return Image.fromarray(arr.numpy(), mode="RGB")


def encode(processor, messages, images=(), *, add_generation_prompt: bool = True) -> dict:
    """Template + tokenize one conversation with its images (in order of their image parts)."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    images = list(images)
    out = processor(text=[text], images=images or None, return_tensors="pt")
    return {
        "input_ids": out["input_ids"][0].tolist(),
        "pixel_values": out.get("pixel_values") if images else None,
        "image_grid_thw": out.get("image_grid_thw") if images else None,
    }


def save_vlm_dir(path, family: str, *, seed: int = 0, tie_word_embeddings: bool = False) -> str:
    """``save_pretrained`` a tiny model, its tokenizer, image processor and processor into ``path``."""
    os.makedirs(path, exist_ok=True)
    tok = vlm_tokenizer()
    model = tiny_vlm(family, seed=seed, tie_word_embeddings=tie_word_embeddings)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    proc = vlm_processor(family, tok)
    proc.image_processor.save_pretrained(path)
    proc.save_pretrained(path)
    return str(path)
