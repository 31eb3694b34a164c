"""Reference backend: pure PyTorch, chunked over tokens and vocabulary.

No ``[N, V]`` tensor is ever built: every pass walks ``[chunk_tokens, chunk_vocab]`` tiles, so the
extra memory is O(chunk_tokens x chunk_vocab) plus the fp32 ``d_weight`` accumulator.  The
math is written once here in its generic form and is what the fast backends are tested
against (together with the dense float64 formulas in the tests):

With ``ls``/``lt`` the student/teacher log-probabilities on the support and a per-element
summand ``s(ls, lt)`` with ``g = ds/dls``, the loss of a token is ``sum_v s_v`` and its gradient
with respect to the student logits is ``dz_j = a_j - q_j * G`` where ``G = sum_v g_v`` and
``a_j = g_j`` on the support (see ``support_terms`` for the teacher-top-k tails).
"""

from __future__ import annotations

import math

import torch

from copsd.ops._spec import DivergenceSpec, LogitSpec

NAME = "reference"
CHUNK_TOKENS = 256
CHUNK_VOCAB = 4096


def missing():
    return None


def available():
    return True


def supports(op, device):
    return True


def merge_attention_states(o_a, lse_a, o_b, lse_b):
    from copsd.backends._reference_attention import merge_attention_states as impl

    return impl(o_a, lse_a, o_b, lse_b)


def shared_prefix_attention(q, k, v, prefix_k, prefix_v, scale, seq_lens):
    from copsd.backends._reference_attention import shared_prefix_attention as impl

    return impl(q, k, v, prefix_k, prefix_v, scale, seq_lens)


def merge_attention_states_backward(o_a, lse_a, o_b, lse_b, lse, g_o, g_lse):
    from copsd.backends._reference_attention import merge_attention_states_backward as impl

    return impl(o_a, lse_a, o_b, lse_b, lse, g_o, g_lse)


def shared_prefix_attention_backward(q, k, v, prefix_k, prefix_v, scale, seq_lens, o, lse, g_o, g_lse):
    from copsd.backends._reference_attention import shared_prefix_attention_backward as impl

    return impl(q, k, v, prefix_k, prefix_v, scale, seq_lens, o, lse, g_o, g_lse)


# ----------------------------------------------------------------------------- logits


def _compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def transform(r, spec: LogitSpec):
    """Raw logits ``r = x . w`` -> (final logits, the softcap's tanh for the chain rule, or None).

    The one torch copy of the logit transform: the Triton host code (gathered teacher-top-k logits,
    the chunked top-k) uses it too; the kernels have their own in ``copsd_kernels._common``.

    The identity steps (scale 1, no softcap, temperature 1) are skipped, so the result may be ``r`` itself:
    callers must not write into it unless ``r`` is theirs to overwrite."""
    z = r if spec.logit_scale == 1 else r * spec.logit_scale
    th = None
    if spec.softcap is not None:
        th = torch.tanh(z / spec.softcap)
        z = spec.softcap * th
    return (z if spec.temperature == 1 else z / spec.temperature), th


def _logits(x, w, spec: LogitSpec):
    """Tile of final logits and the pre-softcap tanh (for the chain rule)."""
    return transform(x @ w.T, spec)


def chain_rule(dz, th, spec: LogitSpec):
    """d(final logits) -> d(x @ w.T).  Identity steps are skipped (the result may be ``dz`` itself)."""
    if spec.temperature != 1:
        dz = dz / spec.temperature
    if th is not None:
        dz = dz * (1.0 - th * th)
    return dz if spec.logit_scale == 1 else dz * spec.logit_scale


def _vocab_chunks(V):
    for v0 in range(0, V, CHUNK_VOCAB):
        yield v0, min(v0 + CHUNK_VOCAB, V)


def _token_chunks(N):
    for n0 in range(0, N, CHUNK_TOKENS):
        yield n0, min(n0 + CHUNK_TOKENS, N)


def _lse_update(m, s, z):
    """Online log-sum-exp merge of a tile into the running (max, sum-exp) state."""
    m_new = torch.maximum(m, z.max(dim=1).values)
    # Rows that have seen only -inf so far (a tile fully inside the top-k set) keep s = 0.
    m_safe = torch.where(m_new == -math.inf, torch.zeros_like(m_new), m_new)
    s = s * torch.exp(m - m_safe) + torch.exp(z - m_safe[:, None]).sum(dim=1)
    return m_new, s


def _lse_of(m, s):
    return m + torch.log(s)


# ----------------------------------------------------------------------------- log-probs


def logprobs_forward(hidden, weight, ids, logit: LogitSpec):
    N, V = hidden.shape[0], weight.shape[0]
    cd = _compute_dtype(hidden)
    lp = torch.empty(N, dtype=cd, device=hidden.device)
    ent = torch.empty_like(lp)
    lse = torch.empty_like(lp)
    for n0, n1 in _token_chunks(N):
        x = hidden[n0:n1].to(cd)
        T = n1 - n0
        m = torch.full((T,), -math.inf, dtype=cd, device=x.device)
        s = torch.zeros(T, dtype=cd, device=x.device)
        # W = sum e^{z-m} (z-m): relative to the running max so the entropy H = log S - W/S
        # does not cancel catastrophically at large logit scales.
        wz = torch.zeros(T, dtype=cd, device=x.device)
        zid = torch.zeros(T, dtype=cd, device=x.device)
        idc = ids[n0:n1]
        for v0, v1 in _vocab_chunks(V):
            z, _ = _logits(x, weight[v0:v1].to(cd), logit)
            m_new = torch.maximum(m, z.max(dim=1).values)
            r = torch.exp(m - m_new)
            d = z - m_new[:, None]
            e = torch.exp(d)
            wz = r * (wz + s * torch.nan_to_num(m - m_new, neginf=0.0)) + (e * d).sum(1)
            s = s * r + e.sum(1)
            m = m_new
            inside = (idc >= v0) & (idc < v1)
            zid = torch.where(inside, z.gather(1, (idc - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0], zid)
        lse_c = m + torch.log(s)
        lse[n0:n1] = lse_c
        lp[n0:n1] = zid - lse_c
        ent[n0:n1] = torch.log(s) - wz / s
    return lp, ent, lse


def logprobs_backward(hidden, weight, ids, lse, entropy, g_lp, g_ent, g_lse, logit: LogitSpec):
    N, V = hidden.shape[0], weight.shape[0]
    cd = _compute_dtype(hidden)
    zeros = torch.zeros(N, dtype=cd, device=hidden.device)
    g_lp = zeros if g_lp is None else g_lp.to(cd)
    g_ent = zeros if g_ent is None else g_ent.to(cd)
    g_lse = zeros if g_lse is None else g_lse.to(cd)
    dx = torch.zeros(hidden.shape, dtype=cd, device=hidden.device)
    dw = torch.zeros(weight.shape, dtype=cd, device=hidden.device)
    for n0, n1 in _token_chunks(N):
        x = hidden[n0:n1].to(cd)
        L, H = lse[n0:n1, None].to(cd), entropy[n0:n1, None].to(cd)
        a, b, c = g_lp[n0:n1, None], g_ent[n0:n1, None], g_lse[n0:n1, None]
        idc = ids[n0:n1]
        for v0, v1 in _vocab_chunks(V):
            wc = weight[v0:v1].to(cd)
            z, th = _logits(x, wc, logit)
            ls = z - L
            q = torch.exp(ls)
            # d/dz of (a*lp + b*H + c*lse): a*[j==id] - q*(a - c + b*(ls + H))
            dz = -q * (a - c + b * (ls + H))
            inside = (idc >= v0) & (idc < v1)
            rows = torch.nonzero(inside)[:, 0]
            dz[rows, idc[rows] - v0] += a[rows, 0]
            dz = chain_rule(dz, th, logit)
            dx[n0:n1] += dz @ wc
            dw[v0:v1] += dz.T @ x
    return dx, dw


# ----------------------------------------------------------------------------- top-k


def topk(hidden, weight, k, logit: LogitSpec):
    N, V = hidden.shape[0], weight.shape[0]
    cd = _compute_dtype(hidden)
    out_ids = torch.empty(N, k, dtype=torch.int64, device=hidden.device)
    out_lp = torch.empty(N, k, dtype=cd, device=hidden.device)
    lse = torch.empty(N, dtype=cd, device=hidden.device)
    for n0, n1 in _token_chunks(N):
        x = hidden[n0:n1].to(cd)
        T = n1 - n0
        m = torch.full((T,), -math.inf, dtype=cd, device=x.device)
        s = torch.zeros(T, dtype=cd, device=x.device)
        best_v = torch.empty(T, 0, dtype=cd, device=x.device)
        best_i = torch.empty(T, 0, dtype=torch.int64, device=x.device)
        for v0, v1 in _vocab_chunks(V):
            z, _ = _logits(x, weight[v0:v1].to(cd), logit)
            m, s = _lse_update(m, s, z)
            kk = min(k, v1 - v0)
            tv, ti = z.topk(kk, dim=1)
            cand_v = torch.cat([best_v, tv], 1)
            cand_i = torch.cat([best_i, ti + v0], 1)
            keep = min(k, cand_v.shape[1])
            best_v, sel = cand_v.topk(keep, dim=1)
            best_i = cand_i.gather(1, sel)
        L = _lse_of(m, s)
        out_ids[n0:n1] = best_i
        out_lp[n0:n1] = best_v - L[:, None]
        lse[n0:n1] = L
    return out_ids, out_lp, lse


# ----------------------------------------------------------------------------- divergence


def _summand(ls, lt, div: DivergenceSpec):
    """Per-element summand s and g = ds/dls (before clipping)."""
    if div.kind == "reverse_kl":
        q = torch.exp(ls)
        s = q * (ls - lt)
        return s, s + q  # q (d + 1) = q d + q
    if div.kind == "forward_kl":
        p = torch.exp(lt)
        return p * (lt - ls), -p
    # jsd
    b = div.beta
    lm = torch.logaddexp(ls + math.log1p(-b), lt + math.log(b))
    q, p = torch.exp(ls), torch.exp(lt)
    s = b * p * (lt - lm) + (1.0 - b) * q * (ls - lm)
    return s, (1.0 - b) * q * (ls - lm)


def clipped_summand(ls, lt, div):
    """Per-element summand and its ls-derivative, each clipped to ``div.term_clip`` when set."""
    s, g = _summand(ls, lt, div)
    if div.term_clip is not None:
        keep = s <= div.term_clip
        s = torch.where(keep, s, torch.full_like(s, div.term_clip))
        g = torch.where(keep, g, torch.zeros_like(g))
    return s, g


def _membership(z, local, inside):
    """Bool [T, C]: which columns of this vocabulary tile are among the row's top-k ids.

    Out-of-tile ids were clamped onto the tile's edge columns, so accumulate (a plain
    scatter of False could overwrite a True written at the same column)."""
    hits = torch.zeros(z.shape, dtype=torch.int32, device=z.device)
    return hits.scatter_add_(1, local, inside.to(torch.int32)) > 0


def _full_stats(x, w, logit, cd, V, K=None, ids=None):
    """Full-vocabulary LSE of a token chunk, the logits gathered at ids K and, when K is
    given, the LSE over the vocabulary with K removed (the tail bucket); with ``ids`` [T] also
    ``(logprobs of ids, entropy)`` of the chunk's distribution (else None), from the same logit tiles."""
    T = x.shape[0]
    m = torch.full((T,), -math.inf, dtype=cd, device=x.device)
    s = torch.zeros(T, dtype=cd, device=x.device)
    if K is not None:
        mt = torch.full((T,), -math.inf, dtype=cd, device=x.device)
        st = torch.zeros(T, dtype=cd, device=x.device)
        zK = torch.zeros(K.shape, dtype=cd, device=x.device)
    if ids is not None:
        # W = sum e^{z-m} (z-m) relative to the running max (as in logprobs_forward): H = log S - W/S.
        wz = torch.zeros(T, dtype=cd, device=x.device)
        zid = torch.zeros(T, dtype=cd, device=x.device)
    for v0, v1 in _vocab_chunks(V):
        z, _ = _logits(x, w[v0:v1].to(cd), logit)
        if ids is not None:
            m_new = torch.maximum(m, z.max(dim=1).values)
            d = z - m_new[:, None]
            e = torch.exp(d)
            wz = torch.exp(m - m_new) * (wz + s * torch.nan_to_num(m - m_new, neginf=0.0)) + (e * d).sum(1)
            inside = (ids >= v0) & (ids < v1)
            zid = torch.where(inside, z.gather(1, (ids - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0], zid)
        m, s = _lse_update(m, s, z)
        if K is not None:
            inside = (K >= v0) & (K < v1)
            local = (K - v0).clamp(0, v1 - v0 - 1)
            zK = torch.where(inside, z.gather(1, local), zK)
            in_k = _membership(z, local, inside)
            mt, st = _lse_update(mt, st, z.masked_fill_(in_k, -math.inf))  # the tile's last use
    lse = _lse_of(m, s)
    stats = None if ids is None else (zid - lse, torch.log(s) - wz / s)
    if K is None:
        return lse, None, None, stats
    return lse, zK, _lse_of(mt, st), stats


def support_terms(zsK, zs_lse, zs_tail, ztK, zt_lse, zt_tail, div, has_tail):
    """Loss and support gradients for teacher-top-k support.

    Returns loss[T], gK[T,k] (= a_j on K), g_tail[T] (gradient of the tail entry, scaled by
    exp(ls_j - ls_tail) off K), G[T], normaliser L_s[T] used for q_j (full LSE or LSE over K).
    """
    if div.tail == "renorm":
        Ls = torch.logsumexp(zsK, 1)
        Lt = torch.logsumexp(ztK, 1)
    else:
        Ls, Lt = zs_lse, zt_lse
    ls, lt = zsK - Ls[:, None], ztK - Lt[:, None]
    s, g = clipped_summand(ls, lt, div)
    loss, G = s.sum(1), g.sum(1)
    g_tail = ls_tail = None
    if div.tail == "bucket" and has_tail:
        ls_tail = zs_tail - zs_lse
        lt_tail = zt_tail - zt_lse
        st, gt = clipped_summand(ls_tail, lt_tail, div)
        loss, G, g_tail = loss + st, G + gt, gt
    return loss, g, g_tail, ls_tail, G, Ls


def divergence(s_hidden, s_weight, t_hidden, t_weight, logit: LogitSpec, div: DivergenceSpec,
               topk_ids=None, token_grad=None):
    return _divergence(s_hidden, s_weight, t_hidden, t_weight, logit, div, topk_ids, token_grad, None)[:3]


def divergence_stats(s_hidden, s_weight, t_hidden, t_weight, logit: LogitSpec, div: DivergenceSpec,
                     topk_ids, token_grad, stats_ids):
    """``divergence`` plus the token statistics of ``stats_ids`` from the same logit tiles (no extra GEMM):
    ``(loss, d_s_hidden | None, d_s_weight | None, stats[3, N])``, stats = (student log-prob of the id,
    student entropy, teacher log-prob of the id)."""
    return _divergence(s_hidden, s_weight, t_hidden, t_weight, logit, div, topk_ids, token_grad, stats_ids)


def _divergence(s_hidden, s_weight, t_hidden, t_weight, logit, div, topk_ids, token_grad, stats_ids):
    N, V = s_hidden.shape[0], s_weight.shape[0]
    cd = _compute_dtype(s_hidden)
    dev = s_hidden.device
    loss = torch.empty(N, dtype=cd, device=dev)
    stats = None if stats_ids is None else torch.empty(3, N, dtype=cd, device=dev)
    want_grad = token_grad is not None
    if want_grad:
        dx = torch.zeros(s_hidden.shape, dtype=cd, device=dev)
        dw = torch.zeros(s_weight.shape, dtype=cd, device=dev)
    topk_support = div.support == "teacher_topk"
    for n0, n1 in _token_chunks(N):
        xs, xt = s_hidden[n0:n1].to(cd), t_hidden[n0:n1].to(cd)
        sid = None if stats_ids is None else stats_ids[n0:n1]
        if not topk_support:
            ls_lse, _, _, s_stats = _full_stats(xs, s_weight, logit, cd, V, ids=sid)
            lt_lse, _, _, t_stats = _full_stats(xt, t_weight, logit, cd, V, ids=sid)
            if sid is not None:
                stats[:, n0:n1] = torch.stack([*s_stats, t_stats[0]])
            tot = torch.zeros(n1 - n0, dtype=cd, device=dev)
            G = torch.zeros_like(tot)
            # The tiles are this loop's own, so they are normalised in place and dropped as soon as they are
            # used: the peak is a handful of [chunk_tokens, chunk_vocab] tiles, not up to nine.
            for v0, v1 in _vocab_chunks(V):
                ls = _logits(xs, s_weight[v0:v1].to(cd), logit)[0].sub_(ls_lse[:, None])
                lt = _logits(xt, t_weight[v0:v1].to(cd), logit)[0].sub_(lt_lse[:, None])
                s, g = clipped_summand(ls, lt, div)
                del ls, lt
                tot += s.sum(1)
                G += g.sum(1)
                del s, g
            loss[n0:n1] = tot
            if want_grad:
                tg = token_grad[n0:n1].to(cd)[:, None]
                for v0, v1 in _vocab_chunks(V):
                    wc = s_weight[v0:v1].to(cd)
                    ls, th = _logits(xs, wc, logit)
                    ls.sub_(ls_lse[:, None])
                    lt = _logits(xt, t_weight[v0:v1].to(cd), logit)[0].sub_(lt_lse[:, None])
                    g = clipped_summand(ls, lt, div)[1]
                    del lt
                    q = torch.exp(ls)
                    del ls
                    dz = chain_rule(g.sub_(q.mul_(G[:, None])).mul_(tg), th, logit)  # tg (g - q G)
                    del q, g
                    dx[n0:n1] += dz @ wc
                    dw[v0:v1] += dz.T @ xs
                    del dz
            continue

        K = topk_ids[n0:n1]
        has_tail = K.shape[1] < V
        zs_lse, zsK, zs_tail, s_stats = _full_stats(xs, s_weight, logit, cd, V, K, ids=sid)
        zt_lse, ztK, zt_tail, t_stats = _full_stats(xt, t_weight, logit, cd, V, K, ids=sid)
        if sid is not None:
            stats[:, n0:n1] = torch.stack([*s_stats, t_stats[0]])
        tot, gK, g_tail, ls_tail, G, Ls = support_terms(
            zsK, zs_lse, zs_tail, ztK, zt_lse, zt_tail, div, has_tail)
        loss[n0:n1] = tot
        if not want_grad:
            continue
        tg = token_grad[n0:n1].to(cd)[:, None]
        for v0, v1 in _vocab_chunks(V):
            wc = s_weight[v0:v1].to(cd)
            zs, th = _logits(xs, wc, logit)
            inside = (K >= v0) & (K < v1)
            local = (K - v0).clamp(0, v1 - v0 - 1)
            in_k = _membership(zs, local, inside)
            a = torch.zeros_like(zs)  # gK on the row's top-k columns, zero elsewhere
            a.scatter_add_(1, local, torch.where(inside, gK, torch.zeros_like(gK)))
            # The tile's own buffers are reused in place (as in the full-support loop above): a handful of
            # [chunk_tokens, chunk_vocab] tiles live at once, not one per step of the expression.
            if div.tail != "renorm" and g_tail is not None:
                # off K: exp(zs - lse - ls_tail) g_tail; on K: a (zero off K, so a plain sum)
                off = (zs - zs_lse[:, None]).sub_(ls_tail[:, None]).exp_().mul_(g_tail[:, None])
                a.add_(off.masked_fill_(in_k, 0.0))
                del off
            q = zs.sub_(Ls[:, None]).exp_()  # zs is not needed again
            if div.tail == "renorm":
                q.masked_fill_(~in_k, 0.0)
            del in_k
            dz = chain_rule(a.sub_(q.mul_(G[:, None])).mul_(tg), th, logit)  # tg (a - q G)
            del q
            dx[n0:n1] += dz @ wc
            dw[v0:v1] += dz.T @ xs
            del dz, a
    if want_grad:
        return loss, dx, dw, stats
    return loss, None, None, stats
