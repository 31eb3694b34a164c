"""Teacher scoring with shared-prefix KV reuse.

Every teacher sequence is ``context + response`` where the context is ``constitution + prompt`` (already
templated token ids).  Re-encoding the constitution for every sequence and the prompt for each of its G
responses is most of the teacher's cost, so the scorer splits each sequence in three levels:

1. a **prefix** shared by a group of contexts (the longest common token prefix, i.e. the constitution);
   its K/V are computed once and cached across calls for the life of the frozen teacher, keyed by the
   prefix token ids and dropped when a parameter changes (``data_ptr`` / ``_version`` fingerprint);
2. the **context remainder** of each distinct context (computed once per call, shared by its responses);
3. the **suffix** of each request: the last context token followed by the response minus its last token,
   i.e. exactly the positions whose hidden states predict the response tokens.

Levels 2 and 3 run through the model's own layers with explicit ``position_ids`` (so RoPE sees the true
positions) and a custom attention function registered with transformers' public ``AttentionInterface``:
inside it, the queries attend to the stored K/V of the earlier levels plus their own tokens causally.
Anything the scorer cannot reproduce exactly (a sliding window shorter than a sequence, attention sinks,
a layer that bypasses the attention interface) makes it fall back to full re-encoding with a one-time
warning, never to different numbers.

Vision-language models (``score(..., vision=)``, Qwen2-VL / Qwen2.5-VL / Qwen3-VL): the rotary positions are
3-D (M-RoPE) and depend on the image grids, but the model's ``get_rope_index`` computes them from the token
ids and grids alone, so the scorer computes them for every full ``context + response`` up front (no
forward) and hands each level its slice.  The shared prefix stops before the first image placeholder of
any context of its group (token ids cannot tell two images apart, so a cached prefix never holds image
features), so the constitution text placed before the images stays shared; each distinct context
(its tokens *and* its pixels) runs the vision tower once, batched, in level 2, with Qwen3-VL's deepstack
features added at its image positions; level 3 is text only.  Response tokens are always text.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from copsd import _hf
from copsd import multimodal as mm

_ATTN_NAME = "copsd_prefix_reuse"
_LOCAL = threading.local()


class _Unsupported(Exception):
    """Raised inside a forward when exact reuse is impossible; the scorer falls back to re-encoding."""


@dataclass
class TeacherOutput:
    """Teacher statistics, packed over requests.

    ``hidden [T, H]``: for each request i, ``len(responses[i])`` rows, the final hidden state (after the final
    norm, what the lm_head consumes) at the positions that predict response tokens 0, 1, ...
    ``offsets [n+1]`` int64: request i owns rows ``offsets[i]:offsets[i+1]``.
    ``logprobs [T]`` fp32, ``topk_ids [T, k]`` int64 (descending) and ``topk_logprobs [T, k]`` when asked.
    """

    hidden: torch.Tensor
    offsets: torch.Tensor
    logprobs: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------------
# The attention function.  It is a plain function of (module, q, k, v) that transformers calls per layer;
# what it attends to besides the current tokens comes from a thread-local "plan" set by the scorer.


@dataclass
class _Plan:
    mode: str                      # "record": causal self-attention + store K/V; "extend": use stored K/V
    num_layers: int
    prefix: list | None = None     # per layer (K [Hkv, P, D], V) shared by the whole batch, or None
    middle: list | None = None     # per layer (K [B, Hkv, M, D], V) per-row context remainder, or None
    middle_lens: torch.Tensor | None = None  # [B] valid middle lengths
    record: list | None = None     # filled per layer with (K [B, Hkv, S, D], V) of the current tokens
    max_len: int = 0               # longest absolute sequence in this forward (sliding-window check)
    seen: set | None = None
    # cascade mode (copsd.ops.shared_prefix_attention): rows [a, b) share context slot `slot` (remainder
    # length m) whose K/V sit in mid_store[layer] = (K [U, Hkv, W, D], V); own_lens [B] marks right padding.
    cascade: bool = False
    own_lens: torch.Tensor | None = None
    segments: list | None = None
    mid_store: list | None = None


def _attend(q, k, v, mask, scale, softcap, is_causal):
    """Attention of q [B, Hq, S, D] over k/v [B, Hkv, K, D]; mask bool [B, 1, S, K] (True = visible)."""
    rep = q.shape[1] // k.shape[1]
    if softcap is None:
        if rep > 1:  # explicit repeat keeps this independent of the torch version's enable_gqa support
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                              scale=scale)
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    if is_causal and mask is None:
        s, kl = q.shape[2], k.shape[2]
        mask = torch.ones(s, kl, dtype=torch.bool, device=q.device).tril(kl - s)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v.float()).to(q.dtype)


def _prefix_reuse_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    plan: _Plan | None = getattr(_LOCAL, "plan", None)
    if plan is None:
        raise _Unsupported("copsd prefix-reuse attention called outside TeacherScorer.score")
    layer = getattr(module, "layer_idx", None)
    if layer is None or not 0 <= layer < plan.num_layers:
        raise _Unsupported(f"attention module {type(module).__name__} has no usable layer_idx")
    window = kwargs.get("sliding_window")
    if window is not None and plan.max_len >= int(window):
        raise _Unsupported(f"sliding window {window} shorter than a sequence ({plan.max_len} tokens)")
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise _Unsupported(f"attention {name} not supported")
    if dropout and module.training:
        raise _Unsupported("attention dropout in training mode")
    plan.seen.add(layer)
    softcap = kwargs.get("softcap")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if plan.record is not None:
        plan.record[layer] = (key, value)
    if plan.mode == "record":
        out = _attend(query, key, value, None, scale, softcap, is_causal=True)
        return out.transpose(1, 2).contiguous(), None

    if plan.cascade:
        if softcap is not None:  # the scorer only plans cascade for models without attention softcapping
            raise _Unsupported("attention logit softcapping in cascade mode")
        return _cascade_attention(plan, layer, query, key, value, scale), None

    b, _, s, _ = query.shape
    parts_k, parts_v, masks = [], [], []
    dev = query.device
    if plan.prefix is not None:
        pk, pv = plan.prefix[layer]
        parts_k.append(pk.unsqueeze(0).expand(b, -1, -1, -1))
        parts_v.append(pv.unsqueeze(0).expand(b, -1, -1, -1))
        masks.append(torch.ones(b, s, pk.shape[1], dtype=torch.bool, device=dev))
    if plan.middle is not None:
        mk, mv = plan.middle[layer]
        parts_k.append(mk)
        parts_v.append(mv)
        cols = torch.arange(mk.shape[2], device=dev)
        masks.append((cols[None, :] < plan.middle_lens[:, None]).unsqueeze(1).expand(b, s, -1))
    parts_k.append(key)
    parts_v.append(value)
    masks.append(torch.ones(s, s, dtype=torch.bool, device=dev).tril().expand(b, s, s))
    k = torch.cat(parts_k, dim=2)
    v = torch.cat(parts_v, dim=2)
    mask = torch.cat(masks, dim=2).unsqueeze(1)
    out = _attend(query, k, v, mask, scale, softcap, is_causal=False)
    return out.transpose(1, 2).contiguous(), None


def _cascade_attention(plan: _Plan, layer: int, query, key, value, scale) -> torch.Tensor:
    """Cascade form: every row attends to one shared prefix (constitution [+ its context remainder]) and to
    its own tokens causally, through copsd.ops.shared_prefix_attention (no mask, no K/V copies per row)."""
    from copsd.ops import shared_prefix_attention

    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [B, S, H, D]
    if plan.prefix is not None:
        pk, pv = (t.transpose(0, 1) for t in plan.prefix[layer])  # [P, Hkv, D]
    else:
        pk = pv = k.new_zeros(0, k.shape[2], k.shape[3])
    if plan.segments is None:
        return shared_prefix_attention(q, k, v, pk, pv, scale=scale, seq_lens=plan.own_lens)[0]
    outs = []
    mk_all, mv_all = plan.mid_store[layer]
    for a, b, slot, m in plan.segments:
        seg_k = torch.cat([pk, mk_all[slot, :, :m].transpose(0, 1)], dim=0)
        seg_v = torch.cat([pv, mv_all[slot, :, :m].transpose(0, 1)], dim=0)
        outs.append(shared_prefix_attention(q[a:b], k[a:b], v[a:b], seg_k, seg_v, scale=scale,
                                            seq_lens=plan.own_lens[a:b])[0])
    return torch.cat(outs, dim=0)


def _register_attention():
    from transformers import AttentionInterface

    AttentionInterface.register(_ATTN_NAME, _prefix_reuse_attention)


# --------------------------------------------------------------------------------------------------
# Helpers


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _group_by_prefix(keys: list[tuple], min_len: int) -> list[tuple[list[int], int]]:
    """Partition ``keys`` (distinct token tuples) into groups sharing a long common prefix.

    Sorted order puts sequences with a common prefix next to each other; a DP over contiguous runs maximises
    the tokens saved, ``(members - 1) * LCP``, with runs whose LCP is below ``min_len`` not grouped.
    Returns ``[(member indices into keys, group LCP)]``; a singleton has LCP = its own length.
    """
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    n = len(order)
    adj = [_lcp(keys[order[i]], keys[order[i + 1]]) for i in range(n - 1)]
    best = [0.0] * (n + 1)
    cut = [0] * (n + 1)
    for j in range(n):  # best partition of order[:j+1]; last run is order[i..j]
        best[j + 1], cut[j + 1] = best[j], j
        run_lcp = math.inf
        for i in range(j - 1, -1, -1):
            run_lcp = min(run_lcp, adj[i])
            if run_lcp < min_len:
                break
            value = best[i] + (j - i) * run_lcp
            if value > best[j + 1]:
                best[j + 1], cut[j + 1] = value, i
    groups = []
    j = n
    while j > 0:
        i = cut[j]
        members = [order[t] for t in range(i, j)]
        lcp = min(adj[i:j - 1]) if j - i > 1 else len(keys[order[i]])
        groups.append((members, lcp))
        j = i
    return groups[::-1]


def _fingerprint(model) -> tuple:
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in model.parameters())


def _chunks(items: list, lengths: list[int], max_tokens: int):
    """Split ``items`` into runs whose padded size ``len(run) * max(length)`` fits ``max_tokens``."""
    run, longest = [], 0
    for item, n in zip(items, lengths):
        if run and (len(run) + 1) * max(longest, n) > max_tokens:
            yield run
            run, longest = [], 0
        run.append(item)
        longest = max(longest, n)
    if run:
        yield run


def _pad(rows: list[Sequence[int]], device, value: int = 0) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out.to(device)


def _check_ids(name: str, seqs, vocab: int, *, allow_empty: bool) -> list[tuple[int, ...]]:
    if isinstance(seqs, (str, bytes)) or not isinstance(seqs, Sequence):
        raise ValueError(f"{name}: expected a sequence of token-id sequences, got {type(seqs).__name__}")
    out = []
    for i, s in enumerate(seqs):
        if isinstance(s, torch.Tensor):
            s = s.tolist()
        if isinstance(s, (str, bytes)) or not isinstance(s, Sequence):
            raise ValueError(f"{name}[{i}]: expected a sequence of token ids, got {type(s).__name__}")
        t = tuple(int(x) for x in s)
        if not t and not allow_empty:
            raise ValueError(f"{name}[{i}]: expected at least one token, got an empty sequence")
        if t and (min(t) < 0 or max(t) >= vocab):
            raise ValueError(f"{name}[{i}]: expected token ids in [0, {vocab}), "
                             f"got values in [{min(t)}, {max(t)}]")
        out.append(t)
    return out


def check_compatible(student, teacher, student_tokenizer=None, teacher_tokenizer=None) -> None:
    """Raise ValueError unless student and teacher share one vocabulary (same ids mean the same tokens)."""
    vs = student.get_output_embeddings().weight.shape[0]
    vt = teacher.get_output_embeddings().weight.shape[0]
    if vs != vt:
        raise ValueError(f"teacher: expected an lm_head over the student's vocabulary of {vs} rows, got {vt}")
    if (student_tokenizer is None) != (teacher_tokenizer is None):
        raise ValueError("teacher_tokenizer: pass both tokenizers or neither")
    if student_tokenizer is not None:
        sv, tv = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        if sv != tv:
            diff = len(set(sv.items()) ^ set(tv.items()))
            raise ValueError(f"teacher_tokenizer: expected the student tokenizer's vocabulary, "
                             f"{diff} (token, id) entries differ")
        for attr in ("eos_token_id", "pad_token_id"):
            if getattr(student_tokenizer, attr, None) != getattr(teacher_tokenizer, attr, None):
                raise ValueError(f"teacher_tokenizer: {attr} differs from the student tokenizer's")


# --------------------------------------------------------------------------------------------------


class TeacherScorer:
    """Scores responses under a frozen teacher, reusing the K/V of shared prefixes (see module docstring).

    ``prefix_reuse=False`` gives plain re-encoding of every ``context + response`` (the reference path).
    ``min_shared_prefix``: a common prefix shorter than this is not worth a cache entry.
    ``max_batch_tokens``: bound on padded query tokens per forward (memory).
    ``max_cached_prefixes``: prefix K/V entries kept across calls (least recently used dropped first).
    ``attention``: how the reused K/V are attended to, "masked" (SDPA + boolean mask), "cascade"
    (``copsd.ops.shared_prefix_attention``) or "auto" (cascade on CUDA, masked elsewhere); both are exact.
    """

    def __init__(self, model, *, prefix_reuse: bool = True, min_shared_prefix: int = 16,
                 max_batch_tokens: int = 16384, max_cached_prefixes: int = 8, attention: str = "auto"):
        self.vlm = mm.vlm_parts(model)
        if self.vlm is not None:  # the language model: takes inputs_embeds, returns the final-norm hidden
            self.decoder, self.head = self.vlm.language_model, self.vlm.head
        else:
            self.decoder, self.head = _hf.decoder_and_head(model)
        if not isinstance(min_shared_prefix, int) or min_shared_prefix < 1:
            raise ValueError(f"min_shared_prefix: expected an int >= 1, got {min_shared_prefix!r}")
        if not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens: expected an int >= 1, got {max_batch_tokens!r}")
        if not isinstance(max_cached_prefixes, int) or max_cached_prefixes < 0:
            raise ValueError(f"max_cached_prefixes: expected an int >= 0, got {max_cached_prefixes!r}")
        if attention not in ("auto", "masked", "cascade"):
            raise ValueError(f"attention: expected 'auto', 'masked' or 'cascade', got {attention!r}")
        self.model = model
        # "masked": SDPA over [prefix | context remainder | own] keys with a boolean mask (any device);
        # "cascade": copsd.ops.shared_prefix_attention per context (no mask, no per-row K/V copies);
        # "auto": cascade on CUDA, masked elsewhere.
        self.attention = attention
        self.prefix_reuse = bool(prefix_reuse)
        self.min_shared_prefix = min_shared_prefix
        self.max_batch_tokens = max_batch_tokens
        self.max_cached_prefixes = max_cached_prefixes
        tcfg = mm.text_config(model)
        self.logit_scale, self.softcap = _hf.logit_transform(tcfg)
        self.max_context = _hf.max_context(tcfg)
        self.num_layers = int(tcfg.num_hidden_layers)
        # the module whose attention implementation the reuse path switches: only the language model of a
        # VLM (its vision tower keeps its own attention)
        self._attn_owner = self.decoder if self.vlm is not None else model
        self._cache: OrderedDict[tuple, list] = OrderedDict()
        self._cache_fp = None
        self._to_rebuild: list[tuple] = []  # prefixes of a restored cache_state, encoded at the next call
        self._warned = False
        self._fell_back = False
        self.stats = {"prefix_hits": 0, "prefix_misses": 0}

    # ---------------------------------------------------------------- public

    @torch.no_grad()
    def score(self, contexts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
              return_logprobs: bool = False, topk: int | None = None,
              vision: Sequence[mm.VisionInputs | None] | None = None) -> TeacherOutput:
        """Teacher hidden states (and optionally log-probs / top-k) at the positions predicting each response.

        ``vision[i]``: the images of ``contexts[i]`` for a vision-language teacher (or None); the image
        placeholders must already be expanded in the context as the processor does it.
        """
        vocab = self.head.weight.shape[0]
        ctxs = _check_ids("contexts", contexts, vocab, allow_empty=False)
        resps = _check_ids("responses", responses, vocab, allow_empty=True)
        if len(ctxs) != len(resps):
            raise ValueError(f"responses: expected one response per context ({len(ctxs)}), got {len(resps)}")
        if not ctxs:
            raise ValueError("contexts: expected at least one request, got none")
        if topk is not None and (not isinstance(topk, int) or not 1 <= topk <= vocab):
            raise ValueError(f"topk: expected an int in [1, {vocab}] or None, got {topk!r}")
        for i, (c, r) in enumerate(zip(ctxs, resps)):
            if self.max_context is not None and len(c) + len(r) > self.max_context:
                raise ValueError(f"responses[{i}]: context ({len(c)}) + response ({len(r)}) tokens "
                                 f"exceed the model's context of {self.max_context} tokens")
        if vision is not None:
            if isinstance(vision, mm.VisionInputs) or not isinstance(vision, Sequence) or len(vision) != len(ctxs):
                raise ValueError(f"vision: expected a sequence with one VisionInputs or None per context "
                                 f"({len(ctxs)})")
            vision = list(vision)
        if self.vlm is not None or vision is not None:
            for i, c in enumerate(ctxs):
                mm.check_vision(f"vision[{i}]", c, vision[i] if vision is not None else None, self.vlm,
                                f"contexts[{i}]")
            if vision is not None and all(v is None for v in vision):
                vision = None
        was_training = self.model.training
        self.model.eval()
        try:
            hidden = None
            if self.prefix_reuse and not self._fell_back:
                try:
                    hidden = self._score_reuse(ctxs, resps, vision)
                except _Unsupported as err:
                    self._fell_back = True
                    if not self._warned:
                        self._warned = True
                        # stacklevel 3: past torch.no_grad's wrapper of score(), to its caller
                        warnings.warn(f"copsd TeacherScorer: prefix reuse is not exact for this model "
                                      f"({err}); falling back to full re-encoding", stacklevel=3)
                    self._cache.clear()
            if hidden is None:
                hidden = self._score_naive(ctxs, resps, vision)
        finally:
            self.model.train(was_training)
        lengths = torch.tensor([len(r) for r in resps], dtype=torch.long)
        offsets = torch.zeros(len(resps) + 1, dtype=torch.long)
        offsets[1:] = lengths.cumsum(0)
        out = TeacherOutput(hidden=hidden, offsets=offsets.to(hidden.device))
        if return_logprobs or topk:
            from copsd import ops

            kw = dict(logit_scale=self.logit_scale, softcap=self.softcap)
            weight = self.head.weight
            if return_logprobs:
                ids = torch.tensor([t for r in resps for t in r], dtype=torch.long, device=hidden.device)
                out.logprobs = ops.linear_logprobs(hidden, weight, ids, **kw)[0].float()
            if topk:
                tids, tlp, _ = ops.linear_topk(hidden, weight, topk, **kw)
                out.topk_ids, out.topk_logprobs = tids, tlp.float()
        return out

    def clear_cache(self) -> None:
        self._cache.clear()
        self._to_rebuild = []

    def cache_state(self) -> dict:
        """What a checkpoint must record for a resumed run to score bit for bit as an uninterrupted one: the
        cached prefixes (token ids, least recently used first; not their K/V) and whether reuse fell back.

        The cache is state, not just speed: which prefix a group reuses depends on what is cached
        (:meth:`_choose_prefix`), and hidden states computed over another prefix / remainder split agree with
        each other only to rounding, so a resumed run that starts with an empty cache computes slightly other
        teacher log-probs, rewards and advantages than the run it continues.  No prefixes once the teacher
        changed after they were cached (an EMA teacher): the next call drops them anyway."""
        live = self._cache_fp is not None and self._cache_fp == _fingerprint(self.model)
        prefixes = list(self._cache) if live else self._to_rebuild
        return {"prefixes": [list(p) for p in prefixes], "fell_back": self._fell_back}

    def load_cache_state(self, state: dict) -> None:
        """Restore :meth:`cache_state` (of a teacher with the same weights): the prefixes' K/V are encoded again
        at the next call, in their order, which gives the same numbers as the first time."""
        self._cache.clear()
        self._cache_fp = None
        self._fell_back = bool(state.get("fell_back", False))
        self._to_rebuild = [tuple(int(t) for t in p) for p in state.get("prefixes", ())]

    # ---------------------------------------------------------------- naive path

    def _score_naive(self, ctxs, resps, vision=None) -> torch.Tensor:
        """Re-encode ``context + response[:-1]`` per request (right padded, batched) and gather rows."""
        device = self.head.weight.device
        hsize = self.head.weight.shape[1]
        rows: list[torch.Tensor | None] = [None] * len(ctxs)
        seqs = [c + r[:-1] if r else () for c, r in zip(ctxs, resps)]
        todo = sorted((i for i in range(len(seqs)) if resps[i]), key=lambda i: -len(seqs[i]))
        for run in _chunks(todo, [len(seqs[i]) for i in todo], self.max_batch_tokens):
            ids = _pad([seqs[i] for i in run], device)
            lens = torch.tensor([len(seqs[i]) for i in run], device=device)
            mask = (torch.arange(ids.shape[1], device=device)[None] < lens[:, None]).long()
            if vision is None:
                h = self.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            else:
                h = mm.hidden_states(self.model, ids, mask, [vision[i] for i in run],
                                     [len(ctxs[i]) for i in run], parts=self.vlm)
            for b, i in enumerate(run):
                start = len(ctxs[i]) - 1
                rows[i] = h[b, start: start + len(resps[i])]
        empty = torch.empty(0, hsize, dtype=self.head.weight.dtype, device=device)
        return torch.cat([r if r is not None else empty for r in rows], dim=0)

    # ---------------------------------------------------------------- reuse path

    def _forward(self, ids, positions, plan: _Plan, embeds=None, extra=None) -> torch.Tensor:
        plan.seen = set()
        _LOCAL.plan = plan
        try:
            if embeds is None:
                h = self.decoder(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
            else:
                h = self.decoder(inputs_embeds=embeds, position_ids=positions, use_cache=False,
                                 **(extra or {})).last_hidden_state
        finally:
            _LOCAL.plan = None
        if plan.seen != set(range(self.num_layers)):
            raise _Unsupported(f"only {len(plan.seen)} of {self.num_layers} layers used the attention "
                               "interface")
        return h

    def _prefix_kv(self, prefix: tuple) -> list:
        entry = self._cache.get(prefix)
        if entry is not None:
            self._cache.move_to_end(prefix)
            self.stats["prefix_hits"] += 1
            return entry
        self.stats["prefix_misses"] += 1
        entry = self._encode_prefix(prefix)
        self._insert(prefix, entry)
        return entry

    def _encode_prefix(self, prefix: tuple) -> list:
        device = self.head.weight.device
        plan = _Plan("record", self.num_layers, record=[None] * self.num_layers, max_len=len(prefix))
        ids = torch.tensor([prefix], dtype=torch.long, device=device)
        self._forward(ids, torch.arange(len(prefix), device=device)[None], plan)
        return [(k[0].contiguous(), v[0].contiguous()) for k, v in plan.record]

    def _insert(self, prefix: tuple, entry: list) -> None:
        if self.max_cached_prefixes > 0:
            self._cache[prefix] = entry
            while len(self._cache) > self.max_cached_prefixes:
                self._cache.popitem(last=False)

    def _choose_prefix(self, members: list[tuple], lcp: int) -> tuple:
        """The prefix K/V to use for a group sharing ``lcp`` tokens.

        A cached prefix covering at least 3/4 of the LCP is reused.  Otherwise, if a cached prefix shares at
        least 3/4 of the LCP with this group (e.g. the same constitution followed by prompts that happen to
        start alike), the shared part becomes the new entry, so the stable part (the constitution) ends up
        cached rather than a batch-specific extension of it.  Else the LCP itself.
        """
        head = members[0][:lcp]
        best, common = (), 0
        for key in self._cache:
            if len(best) < len(key) <= lcp and head[: len(key)] == key:
                best = key
            common = max(common, _lcp(key, head))
        if len(members) == 1:  # a lone context: only worth it if already cached
            return best if len(best) >= self.min_shared_prefix else ()
        if lcp < self.min_shared_prefix:
            return ()
        if len(best) >= self.min_shared_prefix and 4 * len(best) >= 3 * lcp:
            return best
        if common >= self.min_shared_prefix and 4 * common >= 3 * lcp:
            return head[:common]
        return head

    def _score_reuse(self, ctxs, resps, vision=None) -> torch.Tensor:
        fp = _fingerprint(self.model)
        if fp != self._cache_fp:
            self._cache.clear()
            self._cache_fp = fp
        device = self.head.weight.device
        owner = self._attn_owner
        old_impl = owner.config._attn_implementation
        try:
            _register_attention()
            owner.set_attn_implementation(_ATTN_NAME)
        except Exception as err:  # a transformers version / model that refuses custom attention
            raise _Unsupported(f"cannot select a custom attention function ({err})") from err
        try:
            for prefix in self._to_rebuild:  # a restored cache_state (not counted as hits or misses)
                self._insert(prefix, self._encode_prefix(prefix))
            self._to_rebuild = []
            return self._score_reuse_inner(ctxs, resps, device, vision)
        finally:
            owner.set_attn_implementation(old_impl)

    def _vision_plan(self, ctxs, resps, vision, device):
        """M-RoPE positions [3, N, L] of every full ``context + response`` (no forward) and, per context, the
        index of its first image placeholder (the shared prefix must stop before it)."""
        image = self.vlm.image_token_id
        for i, c in enumerate(ctxs):
            if c[-1] == image:  # level 3 starts at the last context token, which must be text
                raise _Unsupported(f"contexts[{i}] ends with an image placeholder")
        full = _pad([c + r for c, r in zip(ctxs, resps)], device)
        lens = torch.tensor([len(c) + len(r) for c, r in zip(ctxs, resps)], device=device)
        mask = (torch.arange(full.shape[1], device=device)[None] < lens[:, None]).long()
        pos = mm.rope_positions(self.vlm, full, mask, vision, [len(c) for c in ctxs])
        first = [c.index(image) if image in c else len(c) for c in ctxs]
        return pos, first

    def _score_reuse_inner(self, ctxs, resps, device, vision=None) -> torch.Tensor:
        hsize = self.head.weight.shape[1]
        cascade = self.attention == "cascade" or (self.attention == "auto" and device.type == "cuda")
        cascade = cascade and not getattr(mm.text_config(self.model), "attn_logit_softcapping", None)  # Gemma2
        rows: list[torch.Tensor | None] = [None] * len(ctxs)
        # Distinct contexts, without their last token (that one starts each request's suffix); with images,
        # a context is its tokens and its pixels.
        uniq: dict[tuple, int] = {}
        ctx_of = []
        for i, c in enumerate(ctxs):
            pixels = vision[i].fingerprint() if vision is not None and vision[i] is not None else None
            ctx_of.append(uniq.setdefault((c[:-1], pixels), len(uniq)))
        keys = [k[0] for k in uniq]
        first_req = {}
        for i, u in enumerate(ctx_of):
            first_req.setdefault(u, i)
        pos3 = first_image = None
        if vision is not None:
            pos3, first_image = self._vision_plan(ctxs, resps, vision, device)
        longest = max(len(c) + len(r) for c, r in zip(ctxs, resps))
        for members_idx, lcp in _group_by_prefix(keys, self.min_shared_prefix):
            members = [keys[u] for u in members_idx]
            if vision is not None:  # the shared prefix holds no image placeholder
                lcp = min([lcp] + [first_image[first_req[u]] for u in members_idx])
            prefix = self._choose_prefix(members, lcp)
            p = len(prefix)
            if vision is not None and p:
                reps = torch.tensor([first_req[u] for u in members_idx], device=device)
                if not bool((pos3[:, reps, :p] == torch.arange(p, device=device)).all()):
                    raise _Unsupported("M-RoPE positions of the shared prefix are not 0, 1, 2, ...")
            prefix_kv = self._prefix_kv(prefix) if p else None
            # Level 2: context remainders, batched; K/V kept per context (padded to the group's longest).
            rem_len = {u: len(keys[u]) - p for u in members_idx}
            has_rem = sorted((u for u in members_idx if rem_len[u] > 0), key=lambda u: -rem_len[u])
            width = max(rem_len.values())
            slot = {u: j for j, u in enumerate(members_idx)}
            mid_k = mid_v = None
            if width > 0:
                mid_k = [None] * self.num_layers
                mid_v = [None] * self.num_layers
                for run in _chunks(has_rem, [rem_len[u] for u in has_rem], self.max_batch_tokens):
                    ids = _pad([keys[u][p:] for u in run], device)
                    embeds = extra = None
                    if vision is None:
                        pos = p + torch.arange(ids.shape[1], device=device)[None].expand(len(run), -1)
                    else:
                        pos = self._slice_positions(pos3, [(first_req[u], p, rem_len[u]) for u in run],
                                                    ids.shape[1])
                        feats = mm.features_per_row(self.vlm, [vision[first_req[u]] for u in run])
                        embeds, extra = mm.embed(self.vlm, ids, feats, [rem_len[u] for u in run])
                    plan = _Plan("extend", self.num_layers, prefix=prefix_kv, record=[None] * self.num_layers,
                                 max_len=longest, cascade=cascade)
                    plan.own_lens = torch.tensor([rem_len[u] for u in run], device=device)
                    self._forward(ids, pos, plan, embeds, extra)
                    idx = torch.tensor([slot[u] for u in run], device=device)
                    for layer, (k, v) in enumerate(plan.record):
                        if mid_k[layer] is None:
                            shape = (len(members_idx), k.shape[1], width, k.shape[3])
                            mid_k[layer] = k.new_zeros(shape)
                            mid_v[layer] = v.new_zeros(shape)
                        mid_k[layer][idx, :, : k.shape[2]] = k
                        mid_v[layer][idx, :, : v.shape[2]] = v
            # Level 3: suffixes = last context token + response[:-1], grouped by context.
            group_set = set(members_idx)
            reqs = [i for i in range(len(ctxs)) if ctx_of[i] in group_set and resps[i]]
            # cascade attends per context, so keep each context's responses together
            if cascade:
                reqs.sort(key=lambda i: (ctx_of[i], -len(resps[i])))
            else:
                reqs.sort(key=lambda i: (-len(resps[i]), ctx_of[i]))
            for run in _chunks(reqs, [len(resps[i]) for i in reqs], self.max_batch_tokens):
                ids = _pad([(ctxs[i][-1],) + resps[i][:-1] for i in run], device)
                if vision is None:
                    starts = torch.tensor([len(ctxs[i]) - 1 for i in run], device=device)
                    pos = starts[:, None] + torch.arange(ids.shape[1], device=device)[None]
                else:
                    pos = self._slice_positions(pos3, [(i, len(ctxs[i]) - 1, len(resps[i])) for i in run],
                                                ids.shape[1])
                plan = _Plan("extend", self.num_layers, prefix=prefix_kv, max_len=longest, cascade=cascade)
                plan.own_lens = torch.tensor([len(resps[i]) for i in run], device=device)
                if cascade:
                    plan.segments, a = [], 0
                    while a < len(run):
                        b = a
                        while b < len(run) and ctx_of[run[b]] == ctx_of[run[a]]:
                            b += 1
                        u = ctx_of[run[a]]
                        plan.segments.append((a, b, slot[u], rem_len[u]))
                        a = b
                    plan.mid_store = list(zip(mid_k, mid_v)) if mid_k is not None else None
                    if plan.mid_store is None:
                        plan.segments = None
                elif mid_k is not None:
                    sel = torch.tensor([slot[ctx_of[i]] for i in run], device=device)
                    m = max(rem_len[ctx_of[i]] for i in run)
                    plan.middle = [(k.index_select(0, sel)[:, :, :m], v.index_select(0, sel)[:, :, :m])
                                   for k, v in zip(mid_k, mid_v)]
                    plan.middle_lens = torch.tensor([rem_len[ctx_of[i]] for i in run], device=device)
                h = self._forward(ids, pos, plan)
                for b, i in enumerate(run):
                    rows[i] = h[b, : len(resps[i])]
        empty = torch.empty(0, hsize, dtype=self.head.weight.dtype, device=device)
        return torch.cat([r if r is not None else empty for r in rows], dim=0)

    @staticmethod
    def _slice_positions(pos3: torch.Tensor, spans: list[tuple[int, int, int]], width: int) -> torch.Tensor:
        """[3, len(spans), width] M-RoPE positions: row j = request ``r``'s positions ``start:start+n`` of
        ``pos3``, zero padded on the right (padding is never attended to by a real token)."""
        out = pos3.new_zeros(3, len(spans), width)
        for j, (r, start, n) in enumerate(spans):
            out[:, j, :n] = pos3[:, r, start: start + n]
        return out


__all__ = ["TeacherOutput", "TeacherScorer", "check_compatible"]
