"""Teacher scoring with shared-prefix KV reuse == full re-encoding of every context + response.

Accuracy (float32 models): the error of the scorer's hidden states and log-probs against a float64 copy of the
model is at most a few times that of plain float32 re-encoding (``tests/criteria.py``), not a fixed tolerance.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from criteria import assert_accurate

from copsd._hf import tiny_causal_lm
from copsd.teacher import TeacherScorer, _group_by_prefix, check_compatible

VOCAB = 512
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "gemma2"]


def _rand(gen, n):
    return torch.randint(3, VOCAB, (n,), generator=gen).tolist()


def _batch(gen, consts, g, prompt_lens=(6, 1, 11)):
    """Requests for every constitution x prompt, G responses of random lengths each, shuffled order."""
    ctxs, resps = [], []
    for c in consts:
        for pl in prompt_lens:
            prompt = _rand(gen, pl)
            for _ in range(g):
                ctxs.append(c + prompt)
                resps.append(_rand(gen, int(torch.randint(1, 10, (1,), generator=gen))))
    perm = torch.randperm(len(ctxs), generator=gen).tolist()
    return [ctxs[i] for i in perm], [resps[i] for i in perm]


def _reference(model, ctxs, resps, topk=None, exact=True):
    """Independent reference: one unpadded forward per sequence, full logits from the model's own lm_head.
    With ``exact`` (for a float32 model) also the same from a float64 copy of the model, under ``"exact"``."""
    hs, lps, tids, tlps = [], [], [], []
    for c, r in zip(ctxs, resps):
        ids = torch.tensor([list(c) + list(r)])
        n = len(c)
        with torch.no_grad():  # transformers' last hidden state is the final-norm output the lm_head reads
            out = model(input_ids=ids, output_hidden_states=True)
            h = out.hidden_states[-1][0, n - 1: n - 1 + len(r)]
            logp = out.logits[0, n - 1: n - 1 + len(r)].double().log_softmax(-1)
        hs.append(h)
        lps.append(logp.gather(1, torch.tensor(r)[:, None])[:, 0])
        if topk:
            v, i = logp.topk(topk, dim=-1)
            tids.append(i)
            tlps.append(v)
    out = {"hidden": torch.cat(hs), "logprobs": torch.cat(lps)}
    if topk:
        out["topk_ids"], out["topk_logprobs"] = torch.cat(tids), torch.cat(tlps)
    if exact and next(model.parameters()).dtype != torch.float64:
        out["exact"] = _reference(copy.deepcopy(model).double(), ctxs, resps, topk, exact=False)
    return out


def _assert_close(out, ref):
    """The scorer's error vs the float64 model <= C x that of plain float32 re-encoding (+ a few ulps)."""
    assert out.hidden.shape == ref["hidden"].shape
    assert_accurate(out.hidden, ref["exact"]["hidden"], ref["hidden"], "hidden")
    assert_accurate(out.logprobs, ref["exact"]["logprobs"], ref["logprobs"], "logprobs", dtype=torch.float32)


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_causal_lm(request.param, vocab_size=VOCAB, seed=ARCHS.index(request.param))


@pytest.mark.parametrize("g", [1, 4])
def test_reuse_matches_full_reencoding(model, g):
    gen = torch.Generator().manual_seed(100 + g)
    consts = [_rand(gen, 40), _rand(gen, 29)]
    ctxs, resps = _batch(gen, consts, g)
    # A context without any constitution and one that is exactly a constitution (empty prompt part).
    ctxs += [_rand(gen, 7), list(consts[1])]
    resps += [_rand(gen, 3), _rand(gen, 5)]
    scorer = TeacherScorer(model, min_shared_prefix=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback allowed for supported architectures
        out = scorer.score(ctxs, resps, return_logprobs=True, topk=5)
    assert scorer.stats["prefix_misses"] == 2  # one K/V computation per constitution
    ref = _reference(model, ctxs, resps, topk=5)
    _assert_close(out, ref)
    assert out.offsets.tolist() == [0] + torch.tensor([len(r) for r in resps]).cumsum(0).tolist()
    assert out.logprobs.dtype == torch.float32
    assert torch.equal(out.topk_ids, ref["topk_ids"])
    assert_accurate(out.topk_logprobs, ref["exact"]["topk_logprobs"], ref["topk_logprobs"], "topk logprobs",
                    dtype=torch.float32)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "gemma2"])
def test_cascade_attention_matches_full_reencoding(arch):
    """The copsd.ops.shared_prefix_attention path, chunked into several forwards per level."""
    model = tiny_causal_lm(arch, vocab_size=VOCAB, seed=21)
    gen = torch.Generator().manual_seed(23)
    consts = [_rand(gen, 33), _rand(gen, 20)]
    ctxs, resps = _batch(gen, consts, 3, prompt_lens=(7, 2))
    ctxs.append(list(consts[0]))
    resps.append(_rand(gen, 6))
    scorer = TeacherScorer(model, attention="cascade", max_batch_tokens=40)
    out = scorer.score(ctxs, resps, return_logprobs=True)
    assert scorer.stats["prefix_misses"] == 2
    _assert_close(out, _reference(model, ctxs, resps))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("attention", ["masked", "cascade"])
def test_reuse_on_gpu(attention):
    model = tiny_causal_lm("qwen3", vocab_size=VOCAB, seed=31, device="cuda", hidden_size=128, num_heads=4,
                           num_kv_heads=2)
    gen = torch.Generator().manual_seed(37)
    consts = [_rand(gen, 70), _rand(gen, 45)]
    ctxs, resps = _batch(gen, consts, 4)
    scorer = TeacherScorer(model, attention=attention)
    out = scorer.score(ctxs, resps, return_logprobs=True)
    ref = TeacherScorer(model, prefix_reuse=False).score(ctxs, resps, return_logprobs=True)
    assert (out.hidden - ref.hidden).abs().max().item() <= 1e-4
    assert (out.logprobs - ref.logprobs).abs().max().item() <= 1e-4


def test_cache_reused_across_calls_and_invalidated_on_weight_change():
    model = tiny_causal_lm("llama", vocab_size=VOCAB, seed=3)
    gen = torch.Generator().manual_seed(7)
    consts = [_rand(gen, 36), _rand(gen, 24)]
    scorer = TeacherScorer(model, max_batch_tokens=50)  # several forwards per level
    c1, r1 = _batch(gen, consts, 2, prompt_lens=(4, 9))
    out1 = scorer.score(c1, r1, return_logprobs=True)
    assert scorer.stats == {"prefix_hits": 0, "prefix_misses": 2}
    c2, r2 = _batch(gen, consts, 2, prompt_lens=(5, 2, 8))  # new prompts, same constitutions
    out2 = scorer.score(c2, r2, return_logprobs=True)
    assert scorer.stats == {"prefix_hits": 2, "prefix_misses": 2}
    _assert_close(out1, _reference(model, c1, r1))
    _assert_close(out2, _reference(model, c2, r2))
    again = scorer.score(c1, r1, return_logprobs=True)
    assert (again.logprobs - out1.logprobs).abs().max().item() <= 1e-5

    with torch.no_grad():  # an optimizer-style in-place update of one weight
        model.model.layers[0].self_attn.k_proj.weight.add_(0.05 * torch.randn_like(
            model.model.layers[0].self_attn.k_proj.weight))
    out3 = scorer.score(c2, r2, return_logprobs=True)
    assert scorer.stats["prefix_misses"] == 4
    ref3 = _reference(model, c2, r2)
    _assert_close(out3, ref3)
    assert (ref3["logprobs"] - out2.logprobs.double()).abs().max().item() > 1e-3  # the change mattered

    state = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    out4 = scorer.score(c2, r2, return_logprobs=True)
    assert scorer.stats["prefix_misses"] == 6
    _assert_close(out4, _reference(model, c2, r2))


def test_cache_keeps_the_stable_constitution_when_prompts_share_their_start():
    model = tiny_causal_lm("qwen3", vocab_size=VOCAB, seed=4)
    gen = torch.Generator().manual_seed(19)
    const = _rand(gen, 40)
    scorer = TeacherScorer(model)
    calls = []
    for lead in ([7, 8, 9], [10, 11, 12], [13, 14, 15]):  # the prompts of one call start with the same 3 tokens
        ctxs = [const + lead + _rand(gen, n) for n in (4, 6)]
        resps = [_rand(gen, 5) for _ in ctxs]
        calls.append((ctxs, resps, scorer.score(ctxs, resps, return_logprobs=True)))
    # call 1 caches const+lead1; call 2 caches the shared part (const); call 3 reuses it
    assert scorer.stats == {"prefix_hits": 1, "prefix_misses": 2}
    assert tuple(const) in scorer._cache
    for ctxs, resps, out in calls:
        _assert_close(out, _reference(model, ctxs, resps))


def test_cache_state_restores_a_warm_cache_bit_for_bit():
    """A resumed run's scorer, given the checkpointed cache_state (through JSON, as trainer_state.json holds it),
    scores exactly as the uninterrupted run's warm one: the cache decides the prefix / remainder split."""
    import json

    model = tiny_causal_lm("qwen3", vocab_size=VOCAB, seed=4)
    gen = torch.Generator().manual_seed(29)
    const = _rand(gen, 40)
    calls = []
    for lead in ([7, 8, 9], [10, 11, 12], [13, 14, 15], [16, 17, 18]):
        ctxs = [const + lead + _rand(gen, n) for n in (4, 6)]
        calls.append((ctxs, [_rand(gen, 5) for _ in ctxs]))
    calls.append(([const + [20] + _rand(gen, 3)], [_rand(gen, 4)]))  # a lone context: reuses only what is cached
    warm = TeacherScorer(model)
    for ctxs, resps in calls[:2]:
        warm.score(ctxs, resps)
    state = json.loads(json.dumps(warm.cache_state()))
    assert state == {"prefixes": [list(k) for k in warm._cache], "fell_back": False} and state["prefixes"]
    resumed = TeacherScorer(model)
    resumed.load_cache_state(state)
    assert resumed.cache_state() == state  # a checkpoint written before the next call keeps it
    before = dict(warm.stats)
    for ctxs, resps in calls[2:]:
        a = warm.score(ctxs, resps, return_logprobs=True)
        b = resumed.score(ctxs, resps, return_logprobs=True)
        assert torch.equal(a.hidden, b.hidden) and torch.equal(a.logprobs, b.logprobs)
    assert {k: warm.stats[k] - before[k] for k in before} == resumed.stats  # the rebuild is not counted
    assert resumed.stats["prefix_hits"] >= 3 and list(resumed._cache) == list(warm._cache)
    cold = TeacherScorer(model)  # a resume without the cache state reuses other prefixes (differs by rounding)
    for ctxs, resps in calls[2:]:
        cold.score(ctxs, resps)
    assert cold.stats["prefix_hits"] < resumed.stats["prefix_hits"]
    with torch.no_grad():  # a changed teacher (an EMA one): its cache is dead, nothing to restore
        model.model.norm.weight.add_(0.01)
    assert warm.cache_state() == {"prefixes": [], "fell_back": False}


def test_unsupported_sliding_window_falls_back_with_one_warning():
    model = tiny_causal_lm("mistral", vocab_size=VOCAB, seed=5, sliding_window=8)
    gen = torch.Generator().manual_seed(11)
    ctxs, resps = _batch(gen, [_rand(gen, 20)], 2, prompt_lens=(3, 6))
    scorer = TeacherScorer(model)
    with pytest.warns(UserWarning, match="falling back") as record:
        out = scorer.score(ctxs, resps, return_logprobs=True)
    # reported at the caller's line, not inside torch's no_grad wrapper
    assert [w.filename for w in record if "falling back" in str(w.message)] == [__file__], [w.filename for w in record]
    _assert_close(out, _reference(model, ctxs, resps))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scorer.score(ctxs, resps)  # no second warning


def test_train_mode_restored_and_empty_response():
    model = tiny_causal_lm("qwen2", vocab_size=VOCAB, seed=9).train()
    gen = torch.Generator().manual_seed(13)
    c, r = _rand(gen, 30), _rand(gen, 4)
    out = TeacherScorer(model).score([c + [5], c + [6]], [[], r], return_logprobs=True)
    assert model.training
    assert out.offsets.tolist() == [0, 0, 4] and out.hidden.shape[0] == 4
    model.eval()  # the reference needs eval mode (no dropout)
    ref = _reference(model, [c + [6]], [r])
    assert_accurate(out.logprobs, ref["exact"]["logprobs"], ref["logprobs"], "logprobs", dtype=torch.float32)


def test_group_by_prefix_separates_constitutions():
    gen = torch.Generator().manual_seed(17)
    a, b = _rand(gen, 30), _rand(gen, 25)
    header = [1, 2, 3] * 7  # a 21-token common start shared by both constitutions
    keys = [tuple(header + a + _rand(gen, 4)) for _ in range(3)]
    keys += [tuple(header + b + _rand(gen, 5)) for _ in range(2)] + [tuple(_rand(gen, 9))]
    groups = sorted(_group_by_prefix(keys, 16))
    assert sorted(map(sorted, (m for m, _ in groups))) == [[0, 1, 2], [3, 4], [5]]
    lcps = {tuple(sorted(m)): lcp for m, lcp in groups}
    assert lcps[(0, 1, 2)] >= len(header) + len(a) and lcps[(3, 4)] >= len(header) + len(b)


def test_bad_inputs():
    model = tiny_causal_lm("llama", vocab_size=VOCAB, seed=1, max_position_embeddings=64)
    scorer = TeacherScorer(model)
    with pytest.raises(ValueError, match=r"contexts\[1\]"):
        scorer.score([[4, 5], []], [[6], [7]])
    with pytest.raises(ValueError, match="exceed the model's context"):
        scorer.score([[4] * 40], [[5] * 30])
    with pytest.raises(ValueError, match="one response per context"):
        scorer.score([[4, 5]], [[6], [7]])
    with pytest.raises(ValueError, match="token ids in"):
        scorer.score([[4, VOCAB]], [[6]])
    with pytest.raises(ValueError, match="topk"):
        scorer.score([[4, 5]], [[6]], topk=0)
    with pytest.raises(ValueError, match="contexts"):
        scorer.score("hello", ["x"])
    with pytest.raises(ValueError, match="min_shared_prefix"):
        TeacherScorer(model, min_shared_prefix=0)
    other = tiny_causal_lm("llama", vocab_size=VOCAB + 8)
    with pytest.raises(ValueError, match="vocabulary"):
        check_compatible(model, other)
    check_compatible(model, tiny_causal_lm("qwen3", vocab_size=VOCAB))


class _Tok:
    def __init__(self, vocab, eos=2, pad=0):
        self._v, self.eos_token_id, self.pad_token_id = vocab, eos, pad

    def get_vocab(self):
        return dict(self._v)


def test_check_compatible_tokenizers():
    model = tiny_causal_lm("llama", vocab_size=VOCAB)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    check_compatible(model, model, _Tok(vocab), _Tok(vocab))
    swapped = dict(vocab, t3=4, t4=3)
    with pytest.raises(ValueError, match="teacher_tokenizer"):
        check_compatible(model, model, _Tok(vocab), _Tok(swapped))
    with pytest.raises(ValueError, match="eos_token_id"):
        check_compatible(model, model, _Tok(vocab), _Tok(vocab, eos=5))
