"""The rollout's decode loop with its KV cache written in place gives the very same tokens and log-probs (bit
for bit) as the loop it replaced: transformers' concatenating cache, the attention mask grown by ``torch.cat``
at every token, the logits divided by the temperature even when it is 1, the float64-CDF sampler.

`_old_generate` below is that loop as it was (text models); for vision-language models the in-place cache is
compared with the module's own fallback to the concatenating cache (``rollout._IN_PLACE_CACHE = False``)."""

from __future__ import annotations

import pytest
import torch
from vlm_models import encode, synthetic_image, tiny_vlm, vlm_processor

from copsd import _hf
from copsd import rollout as ro
from copsd._hf import tiny_causal_lm
from copsd.multimodal import VisionInputs

VOCAB = 384


def _old_sample(probs, generator):
    cdf = probs.double().cumsum(-1)
    u = ro._uniforms(probs.shape[0], generator, probs.device)
    tok = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0]
    return tok.clamp_(max=probs.shape[-1] - 1)


@torch.no_grad()
def _old_generate(model, rows, g, max_new, temperature, top_k, top_p, stops, pad, generator):
    """The decode loop before the in-place cache (text models), returning ``[n, steps]`` tokens / log-probs."""
    b, width = len(rows), max(len(p) for p in rows)
    ids = torch.full((b, width), pad, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.long)
    for i, p in enumerate(rows):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    next_pos = torch.tensor([len(p) for p in rows])
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = _hf.output_cache(out)
    logits = out.logits[:, -1].float()
    cache.batch_repeat_interleave(g)
    logits, mask, next_pos = (x.repeat_interleave(g, dim=0) for x in (logits, mask, next_pos))
    n = b * g
    stop_ids = torch.tensor(stops, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    tokens, logps = [], []
    for step in range(max_new):
        if temperature == 0:
            logp, tok = logits.log_softmax(-1), logits.argmax(-1)
        else:
            scaled = logits / temperature
            logp = scaled.log_softmax(-1)
            probs = logp.exp() if top_k == 0 and top_p >= 1.0 else ro._filter_logits(scaled, top_k, top_p).softmax(-1)
            tok = _old_sample(probs, generator)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        tokens.append(tok)
        logps.append(logp.gather(1, tok[:, None])[:, 0])
        done |= torch.isin(tok, stop_ids)
        if step == max_new - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None], use_cache=True,
                    **{_hf.cache_kwarg(model): cache})
        next_pos = next_pos + 1
        logits = out.logits[:, -1].float()
    return torch.stack(tokens, 1), torch.stack(logps, 1)


@pytest.fixture
def count_in_place(monkeypatch):
    """How many times the in-place layers were written (so a test cannot pass on the fallback alone)."""
    calls = [0]
    update = ro._InPlaceLayer.update

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return update(self, *args, **kwargs)

    monkeypatch.setattr(ro._InPlaceLayer, "update", counted)
    return calls


def _check_same(new, old_tok, old_lp):
    for j, comp in enumerate(new.completion_ids):
        assert comp == old_tok[j, :len(comp)].tolist()
        assert torch.equal(new.logprobs[j], old_lp[j, :len(comp)])
        assert new.logprobs[j].dtype == torch.float32


# (arch, config overrides): untied heads, tied embeddings (as Qwen2-0.5B), head_dim != hidden / heads, and a
# model whose cache has sliding-window layers (those keep their own update; the others are swapped)
MODELS = [("llama", {}), ("qwen2", {"tie_word_embeddings": True}), ("qwen3", {"head_dim": 24}),
          ("gemma3", {"tie_word_embeddings": True})]
SAMPLING = [dict(temperature=1.0, top_k=0, top_p=1.0), dict(temperature=0.7, top_k=40, top_p=0.9),
            dict(temperature=0.0, top_k=0, top_p=1.0)]


@pytest.mark.parametrize("arch,overrides", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("sampling", SAMPLING, ids=["t1", "t0.7-topk-topp", "greedy"])
def test_in_place_cache_reproduces_the_old_loop(arch, overrides, sampling, count_in_place):
    model = tiny_causal_lm(arch, vocab_size=VOCAB, seed=3, initializer_range=0.2, **overrides)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (6, 13, 2)]
    g, max_new = 3, 12
    # a stop id that the free run emits early in some samples, so finished rows ride along padded
    free_tok, _ = _old_generate(model, prompts, g, max_new, stops=[], pad=0,
                                generator=torch.Generator().manual_seed(7), **sampling)
    stops = [int(free_tok[1, 3])]
    for seed in (7, 8):
        old_tok, old_lp = _old_generate(model, prompts, g, max_new, stops=stops, pad=0,
                                        generator=torch.Generator().manual_seed(seed), **sampling)
        new = ro.generate(model, prompts, num_generations=g, max_new_tokens=max_new, eos_token_id=stops,
                          pad_token_id=0, generator=torch.Generator().manual_seed(seed), **sampling)
        _check_same(new, old_tok, old_lp)
        if seed == 7:  # the free run's draws: sample 1 stops by step 4
            assert new.finish_reason[1] == "stop" and len(new.completion_ids[1]) <= 4
    if arch != "gemma3":
        assert count_in_place[0] > 0


def test_in_place_cache_with_per_prompt_generators(count_in_place):
    model = tiny_causal_lm("qwen2", vocab_size=VOCAB, seed=5, initializer_range=0.2, tie_word_embeddings=True)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (4, 9)]
    gens = lambda: [torch.Generator().manual_seed(s) for s in (21, 22)]  # noqa: E731
    old_tok, old_lp = _old_generate(model, prompts, 4, 10, 1.3, 0, 1.0, [], 0, gens())
    new = ro.generate(model, prompts, num_generations=4, max_new_tokens=10, temperature=1.3, eos_token_id=[],
                      pad_token_id=0, generator=gens())
    _check_same(new, old_tok, old_lp)
    assert count_in_place[0] > 0


def test_in_place_cache_on_a_vision_language_model(monkeypatch, count_in_place):
    family = "qwen2_vl"
    model = tiny_vlm(family, seed=3, initializer_range=0.2)
    processor = vlm_processor(family)
    prompts, vision = [], []
    for content, images in [([{"type": "image"}, {"type": "text", "text": "Describe the image."}],
                             [synthetic_image(1, (64, 90))]),
                            ([{"type": "text", "text": "What is in this picture?"}], [])]:
        enc = encode(processor, [{"role": "user", "content": content}], images)
        prompts.append(enc["input_ids"])
        vision.append(VisionInputs(enc["pixel_values"], enc["image_grid_thw"]) if images else None)
    kw = dict(num_generations=3, max_new_tokens=8, temperature=1.0, eos_token_id=[], vision=vision)
    new = ro.generate(model, prompts, generator=torch.Generator().manual_seed(4), **kw)
    assert count_in_place[0] > 0
    monkeypatch.setattr(ro, "_IN_PLACE_CACHE", False)
    calls = count_in_place[0]
    old = ro.generate(model, prompts, generator=torch.Generator().manual_seed(4), **kw)
    assert count_in_place[0] == calls  # the fallback did not use the in-place layers
    assert new.completion_ids == old.completion_ids
    assert all(torch.equal(a, b) for a, b in zip(new.logprobs, old.logprobs))


def test_in_place_layer_refuses_what_would_detach_its_buffers():
    model = tiny_causal_lm("llama", vocab_size=VOCAB, seed=0)
    out = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    cache = _hf.output_cache(out)
    ro._in_place_cache(cache, 5)
    layer = cache.layers[0]
    assert isinstance(layer, ro._InPlaceLayer) and cache.get_seq_length() == 3
    k = torch.randn(1, *layer.keys.shape[1:2], 2, layer.keys.shape[3])
    keys, _ = layer.update(k, k.clone())
    assert keys.shape[2] == 5 and torch.equal(keys[:, :, 3:], k) and cache.get_seq_length() == 5
    with pytest.raises(RuntimeError, match="exceed the 5 preallocated"):
        layer.update(k[:, :, :1], k[:, :, :1])
    with pytest.raises(NotImplementedError, match="only decoding"):
        cache.batch_repeat_interleave(2)
