"""Rollouts with a shared prompt prefill: greedy == transformers' generate, seeded sampling, log-probs.

The sampling log-probs (float32 model) are checked against a float64 copy of the model with the error-relative
criterion of ``tests/criteria.py``: at most a few times the error of plain float32 re-scoring."""

from __future__ import annotations

import copy

import pytest
import torch
from criteria import assert_accurate

from copsd._hf import tiny_causal_lm
from copsd.rollout import _filter_logits, generate

VOCAB = 384


def _prompts(seed, lens=(5, 12, 2)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lens]


def _hf_greedy(model, prompt, max_new, eos):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                         eos_token_id=eos, pad_token_id=0)
    gen = out[0, len(prompt):].tolist()
    for i, t in enumerate(gen):  # cut after the first EOS (generate pads the rest)
        if t in eos:
            return gen[: i + 1]
    return gen


def _check_logprobs(logprobs, model, prompt, completion, temperature):
    """Rollout log-probs vs float64 re-scoring, with plain float32 re-scoring as the yardstick."""
    exact = _rescore(copy.deepcopy(model).double(), prompt, completion, temperature)
    assert_accurate(logprobs, exact, _rescore(model, prompt, completion, temperature), "sampling log-probs",
                    dtype=torch.float32)


def _rescore(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1: len(prompt) - 1 + len(completion)].double()
    logp = (logits / temperature).log_softmax(-1)
    return logp.gather(1, torch.tensor(completion)[:, None])[:, 0]


# A larger init spreads the logits so greedy decisions are not near-ties.
@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def model(request):
    return tiny_causal_lm(request.param, vocab_size=VOCAB, seed=1, initializer_range=0.2)


def test_greedy_matches_hf_generate(model):
    prompts = _prompts(0)
    free = generate(model, prompts, num_generations=2, max_new_tokens=10, temperature=0, eos_token_id=[])
    eos = [free.completion_ids[2][4]]  # a token greedy decoding of prompt 1 emits: forces a "stop" there
    out = generate(model, prompts, num_generations=2, max_new_tokens=10, temperature=0, eos_token_id=eos)
    assert out.prompt_index == [0, 0, 1, 1, 2, 2]
    refs = [_hf_greedy(model, p, 10, eos) for p in prompts]
    for j, comp in enumerate(out.completion_ids):
        p = prompts[out.prompt_index[j]]
        assert comp == refs[out.prompt_index[j]]
        assert out.finish_reason[j] == ("stop" if comp[-1] in eos else "length")
        _check_logprobs(out.logprobs[j], model, p, comp, 1.0)
    assert out.finish_reason[2] == "stop" and len(out.completion_ids[2]) <= 5


def test_sampling_seeded_and_logprobs_match_rescoring(model):
    prompts = _prompts(1, (7, 3))
    kw = dict(num_generations=4, max_new_tokens=8, temperature=0.7, top_k=40, top_p=0.9, eos_token_id=[])
    a = generate(model, prompts, generator=torch.Generator().manual_seed(5), **kw)
    b = generate(model, prompts, generator=torch.Generator().manual_seed(5), **kw)
    c = generate(model, prompts, generator=torch.Generator().manual_seed(6), **kw)
    assert a.completion_ids == b.completion_ids
    assert all(torch.equal(x, y) for x, y in zip(a.logprobs, b.logprobs))
    assert a.completion_ids != c.completion_ids
    assert len({tuple(x) for x in a.completion_ids}) > 2  # the G samples of a prompt are not copies
    for j, comp in enumerate(a.completion_ids):
        assert len(comp) == 8 and a.finish_reason[j] == "length"
        assert a.logprobs[j].dtype == torch.float32
        _check_logprobs(a.logprobs[j], model, prompts[a.prompt_index[j]], comp, 0.7)


def test_per_prompt_generators_do_not_depend_on_batch_mates():
    """With one generator per prompt, a prompt's samples are those of generating it alone (float64 model,
    so batching cannot move its logits across a sampling boundary)."""
    model = tiny_causal_lm("qwen2", vocab_size=VOCAB, seed=4, initializer_range=0.2, dtype=torch.float64)
    prompts = _prompts(6, (3, 10, 6))
    kw = dict(num_generations=3, max_new_tokens=7, temperature=1.1, top_p=0.95, eos_token_id=[])
    seeds = [11, 12, 13]
    batched = generate(model, prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], **kw)
    pair = generate(model, prompts[1:], generator=[torch.Generator().manual_seed(s) for s in seeds[1:]], **kw)
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        alone = generate(model, [p], generator=[torch.Generator().manual_seed(s)], **kw)
        assert [c for c, j in zip(batched.completion_ids, batched.prompt_index) if j == i] == alone.completion_ids
        if i > 0:
            assert [c for c, j in zip(pair.completion_ids, pair.prompt_index) if j == i - 1] == alone.completion_ids
    # a shared generator would give prompt 1 other draws than it gets alone
    shared = generate(model, prompts, generator=torch.Generator().manual_seed(12), **kw)
    assert shared.completion_ids[3:6] != batched.completion_ids[3:6]
    with pytest.raises(ValueError, match="one torch.Generator per prompt"):
        generate(model, prompts, generator=[torch.Generator()], **kw)
    with pytest.raises(ValueError, match="generator"):
        generate(model, prompts, generator=3, **kw)


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = tiny_causal_lm("llama", vocab_size=VOCAB, seed=2, initializer_range=0.2)
    prompts = _prompts(3, (4, 9))
    greedy = generate(model, prompts, num_generations=2, max_new_tokens=6, temperature=0, eos_token_id=[])
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        s = generate(model, prompts, num_generations=2, max_new_tokens=6, temperature=1.3, eos_token_id=[],
                     generator=torch.Generator().manual_seed(0), **kw)
        assert s.completion_ids == greedy.completion_ids


def test_filter_logits_against_bruteforce():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 50, generator=gen, dtype=torch.float64)
    for top_k, top_p in ((0, 0.7), (10, 1.0), (10, 0.5), (0, 0.999)):
        got = torch.isfinite(_filter_logits(logits, top_k, top_p))
        for row in range(logits.shape[0]):
            order = logits[row].argsort(descending=True).tolist()
            keep = order[:top_k] if top_k else order
            probs = logits[row, keep].softmax(-1).tolist()
            chosen, mass = [], 0.0
            for tok, pr in zip(keep, probs):  # smallest prefix whose mass reaches top_p
                chosen.append(tok)
                mass += pr
                if mass >= top_p:
                    break
            assert sorted(torch.nonzero(got[row]).flatten().tolist()) == sorted(chosen)


def test_stop_ids_and_mode_restored():
    model = tiny_causal_lm("qwen2", vocab_size=VOCAB, seed=3, initializer_range=0.2).train()
    prompts = _prompts(5, (6,))
    free = generate(model, prompts, num_generations=3, max_new_tokens=12, temperature=1.0, eos_token_id=[],
                    generator=torch.Generator().manual_seed(1))
    assert model.training
    stop = free.completion_ids[0][3]
    out = generate(model, prompts, num_generations=3, max_new_tokens=12, temperature=1.0, eos_token_id=[],
                   stop_token_ids=[stop], generator=torch.Generator().manual_seed(1))
    assert model.training
    assert out.completion_ids[0] == free.completion_ids[0][: free.completion_ids[0].index(stop) + 1]
    for comp, reason in zip(out.completion_ids, out.finish_reason):
        assert (stop in comp) == (reason == "stop")
        assert stop not in comp[:-1]


def test_bad_inputs():
    model = tiny_causal_lm("llama", vocab_size=VOCAB, max_position_embeddings=32)
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        generate(model, [[4], []])
    with pytest.raises(ValueError, match="prompts"):
        generate(model, [])
    with pytest.raises(ValueError, match="exceed the model's context"):
        generate(model, [[4] * 20], max_new_tokens=20)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[4]], temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[4]], top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, [[4]], top_k=-2)
    with pytest.raises(ValueError, match="num_generations"):
        generate(model, [[4]], num_generations=0)
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(model, [[4]], eos_token_id=VOCAB)
    with pytest.raises(ValueError, match="token ids in"):
        generate(model, [[VOCAB + 3]])


def test_sample_follows_the_distribution():
    from copsd.rollout import _sample

    probs = torch.tensor([[0.5, 0.0, 0.2, 0.25, 0.05]]).expand(40000, -1)
    draws = _sample(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).double() / draws.numel()
    assert freq[1] == 0
    assert (freq - probs[0].double()).abs().max().item() < 0.01  # ~4 standard deviations


def test_output_cache_reads_the_current_name_first():
    """transformers 5 names the returned KV cache ``cache``; reading ``past_key_values`` logs a deprecation warning
    on every run, so it is only read where ``cache`` is absent (older transformers)."""
    from copsd._hf import output_cache

    class New:
        cache = "kv"

        @property
        def past_key_values(self):
            raise AssertionError("read the deprecated past_key_values")

    class Old:
        past_key_values = "kv"

    assert output_cache(New()) == "kv" and output_cache(Old()) == "kv"
