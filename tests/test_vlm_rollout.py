"""Rollouts of vision-language models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): greedy == transformers' generate,
sampling log-probs == a plain forward with the images, the vision tower run once per batch (never per sample)."""

from __future__ import annotations

import copy

import pytest
import torch
from criteria import assert_accurate
from vlm_models import FAMILIES, encode, synthetic_image, tiny_vlm, vlm_processor

from copsd.multimodal import VisionInputs, vlm_parts
from copsd.rollout import generate


def _conversations(processor):
    """Three prompts: one image, no image, two images of other sizes (different numbers of vision tokens)."""
    rows = [
        ([{"type": "image"}, {"type": "text", "text": "Describe the image."}], [synthetic_image(1, (64, 90))]),
        ([{"type": "text", "text": "What is in this picture?"}], []),
        ([{"type": "text", "text": "Count the shapes:"}, {"type": "image"}, {"type": "image"}],
         [synthetic_image(2, (120, 60)), synthetic_image(3, (56, 56))]),
    ]
    prompts, vision = [], []
    for content, images in rows:
        enc = encode(processor, [{"role": "user", "content": content}], images)
        prompts.append(enc["input_ids"])
        vision.append(VisionInputs(enc["pixel_values"], enc["image_grid_thw"]) if images else None)
    return prompts, vision


def _no_vision_tokens(model):
    """Bias the lm_head so the model never emits a vision special token (the plain forward used as reference
    cannot take an image placeholder inside a response); the rollout sees the same logits."""
    cfg = model.config
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        for t in (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id):
            head.bias[t] = -1e4
    model.lm_head = head
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def setup(family):
    model = _no_vision_tokens(tiny_vlm(family, seed=3, initializer_range=0.2))
    prompts, vision = _conversations(vlm_processor(family))
    return model, prompts, vision


def _hf_greedy(model, prompt, vis, max_new, eos):
    ids = torch.tensor([prompt])
    kw = {}
    if vis is not None:
        kw = dict(pixel_values=vis.pixel_values, image_grid_thw=vis.image_grid_thw,
                  mm_token_type_ids=(ids == model.config.image_token_id).int())
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                         eos_token_id=eos, pad_token_id=0, **kw)
    gen = out[0, len(prompt):].tolist()
    for i, t in enumerate(gen):
        if t in eos:
            return gen[: i + 1]
    return gen


def _plain_logprobs(model, prompt, vis, completion, temperature):
    """log_softmax(logits / T) at the completion tokens from one forward of prompt + completion, with the
    model computing its own M-RoPE positions (``mm_token_type_ids``) and vision features."""
    ids = torch.tensor([prompt + completion])
    kw = {}
    if vis is not None:
        kw = dict(pixel_values=vis.pixel_values, image_grid_thw=vis.image_grid_thw,
                  mm_token_type_ids=(ids == model.config.image_token_id).int())
    with torch.no_grad():
        logits = model(input_ids=ids, **kw).logits[0, len(prompt) - 1: len(prompt) - 1 + len(completion)]
    logp = (logits.double() / temperature).log_softmax(-1)
    return logp.gather(1, torch.tensor(completion)[:, None])[:, 0]


def test_greedy_matches_hf_generate(setup):
    model, prompts, vision = setup
    eos = [model.config.text_config.eos_token_id]
    out = generate(model, prompts, num_generations=2, max_new_tokens=8, temperature=0, eos_token_id=eos,
                   vision=vision)
    for i in range(len(prompts)):
        a, b = 2 * i, 2 * i + 1  # the two (greedy, hence equal) samples of prompt i
        assert out.completion_ids[a] == out.completion_ids[b] == _hf_greedy(model, prompts[i], vision[i], 8, eos)
        torch.testing.assert_close(out.logprobs[a], out.logprobs[b], atol=0, rtol=0)
        # the greedy log-probs are those of the plain forward
        ref = _plain_logprobs(model, prompts[i], vision[i], out.completion_ids[a], 1.0)
        torch.testing.assert_close(out.logprobs[a].double(), ref, atol=1e-4, rtol=0)


def test_sampling_logprobs_match_a_plain_forward(setup):
    model, prompts, vision = setup
    gens = [torch.Generator().manual_seed(10 + i) for i in range(len(prompts))]
    out = generate(model, prompts, num_generations=3, max_new_tokens=7, temperature=0.8, eos_token_id=[],
                   vision=vision, generator=gens)
    assert out.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    model64 = copy.deepcopy(model).double()
    for j, comp in enumerate(out.completion_ids):
        assert len(comp) == 7 and out.finish_reason[j] == "length"
        i = out.prompt_index[j]
        ref = _plain_logprobs(model, prompts[i], vision[i], comp, 0.8)
        torch.testing.assert_close(out.logprobs[j].double(), ref, atol=1e-4, rtol=0)
        # and the project's error-relative criterion against a float64 twin of the model
        vis64 = vision[i] and vision[i].to(dtype=torch.float64)
        exact = _plain_logprobs(model64, prompts[i], vis64, comp, 0.8)
        assert_accurate(out.logprobs[j], exact, ref.float(), "sampling log-probs", dtype=torch.float32)
    # a prompt's samples do not depend on the other prompts of the batch (per-prompt generators)
    alone = generate(model, [prompts[2]], num_generations=3, max_new_tokens=7, temperature=0.8, eos_token_id=[],
                     vision=[vision[2]], generator=[torch.Generator().manual_seed(12)])
    assert alone.completion_ids == out.completion_ids[6:]


def test_vision_tower_runs_once_per_batch(setup):
    model, prompts, vision = setup
    visual = vlm_parts(model).core.visual
    calls = []
    handle = visual.register_forward_hook(lambda *a: calls.append(1))
    try:
        generate(model, prompts, num_generations=4, max_new_tokens=5, temperature=1.0, eos_token_id=[],
                 vision=vision, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert len(calls) == 1  # one prefill for the whole batch; the 4 samples and the decode steps reuse it


def test_text_prompts_on_a_vlm_and_bad_inputs(family):
    model = tiny_vlm(family, seed=1)
    processor = vlm_processor(family)
    prompts, vision = _conversations(processor)
    # only the text prompt, without vision: plain text generation through the VLM
    a = generate(model, [prompts[1]], max_new_tokens=4, temperature=0, eos_token_id=[])
    b = generate(model, [prompts[1]], max_new_tokens=4, temperature=0, eos_token_id=[], vision=[None])
    assert a.completion_ids == b.completion_ids
    with pytest.raises(ValueError, match="vision: expected a sequence"):
        generate(model, prompts, max_new_tokens=2, vision=vision[:2])
    with pytest.raises(ValueError, match=r"vision\[0\]: 2 image"):
        generate(model, prompts, max_new_tokens=2, vision=[vision[2], None, vision[2]])
    with pytest.raises(ValueError, match=r"vision\[0\]: 0 image"):
        generate(model, prompts, max_new_tokens=2)  # placeholders but no images
    video = model.config.video_token_id
    with pytest.raises(ValueError, match="video"):
        generate(model, [prompts[1] + [video]], max_new_tokens=2)
    with pytest.raises(ValueError, match="pixel_values: expected 7 patch rows"):
        VisionInputs(torch.zeros(5, 8), torch.tensor([[1, 7, 1]]))
    with pytest.raises(ValueError, match="videos"):
        VisionInputs.from_processor_output({"pixel_values_videos": torch.zeros(4, 8)})


def test_vision_on_a_text_model_is_rejected():
    from copsd._hf import tiny_causal_lm

    model = tiny_causal_lm("qwen2", vocab_size=64)
    vis = VisionInputs(torch.zeros(4, 8), torch.tensor([[1, 2, 2]]))
    with pytest.raises(ValueError, match=r"vision\[0\]: images were given but the model is not"):
        generate(model, [[5, 6, 7]], max_new_tokens=2, vision=[vis])


def test_lora_wrapped_tied_vlm():
    """What training hands the rollout engine: a peft LoRA model over the language model of a VLM with tied
    embeddings; greedy equals transformers' generate and the teacher scorer (reusing) equals re-encoding."""
    import warnings

    peft = pytest.importorskip("peft")
    from copsd.teacher import TeacherScorer

    model = tiny_vlm("qwen2_5_vl", seed=5, tie_word_embeddings=True, initializer_range=0.2)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    lora = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                           target_modules=r".*language_model.*\.(q_proj|v_proj)")
    wrapped = peft.get_peft_model(model, lora)
    prompts, vision = _conversations(vlm_processor("qwen2_5_vl"))
    eos = [model.config.text_config.eos_token_id]
    out = generate(wrapped, prompts, num_generations=2, max_new_tokens=6, temperature=0, eos_token_id=eos,
                   vision=vision)
    for i in range(len(prompts)):
        assert out.completion_ids[2 * i] == _hf_greedy(wrapped, prompts[i], vision[i], 6, eos), i
    ctxs = [prompts[i] for i in out.prompt_index]
    vis = [vision[i] for i in out.prompt_index]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        reuse = TeacherScorer(wrapped, min_shared_prefix=4).score(ctxs, out.completion_ids, vision=vis,
                                                                  return_logprobs=True)
    naive = TeacherScorer(wrapped, prefix_reuse=False).score(ctxs, out.completion_ids, vision=vis,
                                                             return_logprobs=True)
    torch.testing.assert_close(reuse.hidden, naive.hidden, atol=1e-4, rtol=0)
    # the teacher's log-probs of a greedy rollout are the rollout's own
    torch.testing.assert_close(reuse.logprobs, torch.cat(out.logprobs), atol=1e-4, rtol=0)
