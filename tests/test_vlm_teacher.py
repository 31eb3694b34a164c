"""Teacher scoring of vision-language models with prefix reuse under M-RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

Reference: a plain forward of the model's base (``model.model``, its ``last_hidden_state`` is after the final
norm) over each full ``context + response`` with the context's ``pixel_values``, the model computing its own
3-D positions from ``mm_token_type_ids``."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from criteria import assert_accurate
from vlm_models import FAMILIES, encode, synthetic_image, tiny_vlm, vlm_processor

from copsd.multimodal import VisionInputs, vlm_parts
from copsd.teacher import TeacherScorer

CONSTITUTION = ("Be helpful and honest; refuse to help anyone hurt a person. Describe what is in the image "
                "and never invent details.")

QUERIES = [  # (question, images): different numbers and sizes of images, and one prompt without any
    ("Describe the image.", [(1, (64, 90))]),
    ("What is in this picture?", []),
    ("Count the shapes:", [(2, (120, 60)), (3, (56, 56))]),
    ("Read the sign in the photo.", [(4, (90, 64))]),
]


def _context(processor, question, images, constitution=CONSTITUTION):
    content = [{"type": "text", "text": constitution + "\n"}] if constitution else []
    content += [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    pil = [synthetic_image(seed, size) for seed, size in images]
    enc = encode(processor, [{"role": "user", "content": content}], pil)
    vis = VisionInputs(enc["pixel_values"], enc["image_grid_thw"]) if pil else None
    return enc["input_ids"], vis


def _batch(processor, g, seed=0, queries=QUERIES):
    """Every query's context G times, each with its own response (lengths 1..9, one empty)."""
    gen = torch.Generator().manual_seed(seed)
    ctxs, vis, resps = [], [], []
    for q, imgs in queries:
        c, v = _context(processor, q, imgs)
        for _ in range(g):
            n = int(torch.randint(1, 10, (1,), generator=gen))
            ctxs.append(c)
            vis.append(v)
            resps.append(torch.randint(10, 390, (n,), generator=gen).tolist())
    resps[1] = []
    return ctxs, resps, vis


def _plain(model, ctxs, resps, vis):
    """Per request: final-norm hidden states predicting the response, and the log-probs of its tokens."""
    base = vlm_parts(model).core
    image = model.config.image_token_id
    hs, lps = [], []
    with torch.no_grad():
        for c, r, v in zip(ctxs, resps, vis):
            if not r:
                continue
            ids = torch.tensor([list(c) + list(r)])
            kw = {}
            if v is not None:
                kw = dict(pixel_values=v.pixel_values, image_grid_thw=v.image_grid_thw,
                          mm_token_type_ids=(ids == image).int())
            h = base(input_ids=ids, **kw).last_hidden_state[0, len(c) - 1: len(c) - 1 + len(r)]
            logp = model.lm_head(h).double().log_softmax(-1)
            hs.append(h)
            lps.append(logp.gather(1, torch.tensor(r)[:, None])[:, 0])
    return torch.cat(hs), torch.cat(lps)


def image_free(tokens, model) -> bool:
    return model.config.image_token_id not in tokens


def _check(out, ref_h, ref_lp, exact=None):
    """Within 1e-4 of the plain float32 forward; with ``exact`` (the same from a float64 copy of the model)
    also the project's error-relative criterion (``tests/criteria.py``)."""
    torch.testing.assert_close(out.hidden, ref_h, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.logprobs.double(), ref_lp, atol=1e-4, rtol=0)
    if exact is not None:
        assert_accurate(out.hidden, exact[0].float(), ref_h, "hidden", dtype=torch.float32)
        assert_accurate(out.logprobs, exact[1], ref_lp, "logprobs", dtype=torch.float32)


def _exact(model, ctxs, resps, vis):
    model64 = copy.deepcopy(model).double()
    return _plain(model64, ctxs, resps, [v and v.to(dtype=torch.float64) for v in vis])


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family):
    return tiny_vlm(family, seed=FAMILIES.index(family) + 7)


@pytest.fixture(scope="module")
def processor(family):
    return vlm_processor(family)


@pytest.mark.parametrize("g", [1, 3])
def test_reuse_matches_plain_forward(model, processor, g):
    ctxs, resps, vis = _batch(processor, g)
    ref_h, ref_lp = _plain(model, ctxs, resps, vis)
    exact = _exact(model, ctxs, resps, vis) if g == 1 else None  # float64 twin: once per family (time)
    scorer = TeacherScorer(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        out = scorer.score(ctxs, resps, vision=vis, return_logprobs=True, topk=3)
    _check(out, ref_h, ref_lp, exact)
    assert out.offsets.tolist() == [0] + torch.tensor([len(r) for r in resps]).cumsum(0).tolist()
    # the constitution (text before the images) is the shared, cached prefix; a second call hits it
    assert scorer.stats == {"prefix_hits": 0, "prefix_misses": 1}
    key = next(iter(scorer._cache))
    image = model.config.image_token_id
    assert image not in key and len(key) >= len(processor.tokenizer(CONSTITUTION)["input_ids"])
    again = scorer.score(ctxs, resps, vision=vis, return_logprobs=True)
    assert scorer.stats["prefix_hits"] == 1
    _check(again, ref_h, ref_lp)
    # the re-encoding reference path gives the same numbers
    naive = TeacherScorer(model, prefix_reuse=False).score(ctxs, resps, vision=vis, return_logprobs=True, topk=3)
    _check(naive, ref_h, ref_lp, exact)
    torch.testing.assert_close(out.topk_logprobs, naive.topk_logprobs, atol=1e-4, rtol=0)


def test_vision_tower_runs_once_per_distinct_context(model, processor):
    visual = vlm_parts(model).core.visual
    seen = []

    def hook(module, args, kwargs, output):
        seen.append(int(kwargs["grid_thw"].shape[0]))

    distinct_images = sum(len(imgs) for _, imgs in QUERIES)
    for g in (1, 4):
        ctxs, resps, vis = _batch(processor, g, seed=g)
        scorer = TeacherScorer(model, max_batch_tokens=100_000)
        handle = visual.register_forward_hook(hook, with_kwargs=True)
        try:
            scorer.score(ctxs, resps, vision=vis)
        finally:
            handle.remove()
        assert sum(seen) == distinct_images, (g, seen)  # every image once, whatever G
        seen.clear()


def test_same_tokens_different_pixels_are_different_contexts(model, processor):
    # two prompts whose token ids are identical (same image size) but whose images differ
    c1, v1 = _context(processor, "Describe the image.", [(11, (64, 90))])
    c2, v2 = _context(processor, "Describe the image.", [(12, (64, 90))])
    assert c1 == c2 and not torch.equal(v1.pixel_values, v2.pixel_values)
    ctxs, vis = [c1, c2, c1, c2], [v1, v2, v1, v2]
    resps = [[50, 60, 70], [50, 60, 70], [80, 90], [80, 90]]
    scorer = TeacherScorer(model, min_shared_prefix=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact reuse, no fallback
        out = scorer.score(ctxs, resps, vision=vis, return_logprobs=True)
    _check(out, *_plain(model, ctxs, resps, vis))
    assert scorer.stats["prefix_misses"] == 1 and image_free(next(iter(scorer._cache)), model)
    assert not torch.allclose(out.hidden[:3], out.hidden[3:6])


def test_text_only_contexts_on_a_vlm(model, processor):
    queries = [(q, []) for q, _ in QUERIES]
    ctxs, resps, vis = _batch(processor, 2, queries=queries)
    ref = _plain(model, ctxs, resps, vis)
    _check(TeacherScorer(model).score(ctxs, resps, return_logprobs=True), *ref)
    _check(TeacherScorer(model).score(ctxs, resps, vision=vis, return_logprobs=True), *ref)


def test_context_ending_with_an_image_falls_back_with_one_warning(model, processor):
    # a context whose last token is an image placeholder: level 3 would need the image; re-encode instead
    c, v = _context(processor, "Describe the image.", [(5, (64, 64))])
    image = model.config.image_token_id
    cut = len(c) - c[::-1].index(image)  # just after the last placeholder
    ctxs, resps, vis = [c[:cut], c[:cut], c], [[40, 41], [42], [43, 44, 45]], [v, v, v]
    ref = _plain(model, ctxs, resps, vis)
    scorer = TeacherScorer(model, min_shared_prefix=4)
    with pytest.warns(UserWarning, match="ends with an image placeholder"):
        out = scorer.score(ctxs, resps, vision=vis, return_logprobs=True)
    _check(out, *ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        _check(scorer.score(ctxs, resps, vision=vis, return_logprobs=True), *ref)


def test_sliding_window_falls_back_with_one_warning():
    # Qwen2-VL-style text layers with a sliding window shorter than the sequences: not reusable exactly
    over = dict(use_sliding_window=True, sliding_window=8, max_window_layers=0)
    model = tiny_vlm("qwen2_vl", seed=6, text_overrides=over)
    assert model.config.text_config.layer_types == ["sliding_attention"] * 2
    ctxs, resps, vis = _batch(vlm_processor("qwen2_vl"), 2, seed=6, queries=QUERIES[:2])
    ref = _plain(model, ctxs, resps, vis)
    with pytest.warns(UserWarning, match="sliding window 8"):
        out = TeacherScorer(model).score(ctxs, resps, vision=vis, return_logprobs=True)
    _check(out, *ref)


def test_cascade_attention(family):
    model = tiny_vlm(family, seed=2)
    processor = vlm_processor(family)
    ctxs, resps, vis = _batch(processor, 2, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = TeacherScorer(model, attention="cascade").score(ctxs, resps, vision=vis, return_logprobs=True)
    _check(out, *_plain(model, ctxs, resps, vis))


def test_bad_vision_inputs(model, processor):
    c, v = _context(processor, "Describe the image.", [(1, (64, 64))])
    scorer = TeacherScorer(model)
    with pytest.raises(ValueError, match="vision: expected a sequence with one VisionInputs"):
        scorer.score([c, c], [[5], [6]], vision=[v])
    with pytest.raises(ValueError, match=r"vision\[1\]: 0 image"):
        scorer.score([c, c], [[5], [6]], vision=[v, None])
    with pytest.raises(ValueError, match=r"vision\[0\]: expected a copsd.multimodal.VisionInputs"):
        scorer.score([c], [[5]], vision=[v.pixel_values])


def test_hidden_states_helper_matches_the_model_with_gradients(family):
    """copsd.multimodal.hidden_states (the training forward of a VLM): a right-padded batch equals the model's
    own per-row forward, values and gradients (language model and vision tower); rows sharing a VisionInputs
    share its vision-tower pass."""
    from copsd.multimodal import hidden_states

    model = tiny_vlm(family, seed=4)
    processor = vlm_processor(family)
    ctxs, resps, vis = _batch(processor, 2, seed=3, queries=QUERIES[:3])  # rows 2k, 2k+1 share one VisionInputs
    seqs = [list(c) + list(r) for c, r in zip(ctxs, resps)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    probe = torch.randn(width, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    params = [vlm_parts(model).language_model.layers[0].self_attn.q_proj.weight, vlm_parts(model).core.visual.
              patch_embed.proj.weight]

    seen = []
    handle = vlm_parts(model).core.visual.register_forward_hook(
        lambda m, a, kw, o: seen.append(int(kw["grid_thw"].shape[0])), with_kwargs=True)
    try:
        h = hidden_states(model, ids, mask, vis, [len(c) for c in ctxs])
    finally:
        handle.remove()
    assert seen == [3]  # one vision-tower pass over the 3 distinct images of the 6 rows
    loss = sum((h[b, : len(s)] * probe[: len(s)]).sum() for b, s in enumerate(seqs))
    grads = torch.autograd.grad(loss, params)

    base = vlm_parts(model).core
    ref_loss = 0
    for b, (s, v) in enumerate(zip(seqs, vis)):
        row = torch.tensor([s])
        kw = {} if v is None else dict(pixel_values=v.pixel_values, image_grid_thw=v.image_grid_thw,
                                       mm_token_type_ids=(row == model.config.image_token_id).int())
        ref = base(input_ids=row, **kw).last_hidden_state[0]
        torch.testing.assert_close(h[b, : len(s)].detach(), ref.detach(), atol=1e-4, rtol=0)
        ref_loss = ref_loss + (ref * probe[: len(s)]).sum()
    for g, r in zip(grads, torch.autograd.grad(ref_loss, params)):
        assert float(r.abs().max()) > 0
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
