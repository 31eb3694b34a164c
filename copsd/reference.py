"""One dense reference per op: the definitions of docs/ops.md written directly in PyTorch.

These materialise what the ops never do (``[N, V]`` logits, ``[B, H, S, P + S]`` attention scores) on purpose:
they are the ground truth the chunked and fused backends are tested against (in float64), the "plain PyTorch"
computation the error-relative criterion compares with (in the op's precision), and the naive baseline of the
benchmarks.  Not a backend: ``copsd.backends.reference`` is the chunked pure-PyTorch *implementation*; this
module is the *definition*, kept independent of it.

=========================  ==============================================================================
op                         reference
=========================  ==============================================================================
linear_logprobs            ``logprobs`` (+ ``logprobs_grads``)
linear_logprobs_loss       ``logprobs`` + the loss, through autograd
linear_topk                ``topk``
linear_divergence          ``divergence`` (+ ``divergence_grads``); ``terms`` is the per-entry summand
shared_prefix_attention    ``attention``
merge_attention_states     ``merge_attention_states``
=========================  ==============================================================================
"""

import torch


def logits(x, w, temperature=1.0, logit_scale=1.0, softcap=None):
    z = logit_scale * (x @ w.T)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def terms(ls, lt, kind, beta):
    q, p = ls.exp(), lt.exp()
    if kind == "reverse_kl":
        return q * (ls - lt)
    if kind == "forward_kl":
        return p * (lt - ls)
    # log m = log((1 - beta) q + beta p), in log space so extreme logits do not underflow m to 0.
    lm = torch.logaddexp(ls + torch.log1p(torch.tensor(-beta, dtype=ls.dtype)),
                         lt + torch.log(torch.tensor(beta, dtype=ls.dtype)))
    return beta * p * (lt - lm) + (1 - beta) * q * (ls - lm)


def divergence(xs, ws, xt, wt, *, kind="reverse_kl", beta=0.5, temperature=1.0, logit_scale=1.0, softcap=None,
               support="full", topk_ids=None, tail="bucket", term_clip=None):
    """Per-token divergence [N] (differentiable through autograd)."""
    zs = logits(xs, ws, temperature, logit_scale, softcap)
    zt = logits(xt, wt, temperature, logit_scale, softcap)
    if support == "full":
        t = terms(zs.log_softmax(-1), zt.log_softmax(-1), kind, beta)
    else:
        K = topk_ids
        zsK, ztK = zs.gather(1, K), zt.gather(1, K)
        if tail == "renorm":
            lsK, ltK = zsK.log_softmax(-1), ztK.log_softmax(-1)
            t = terms(lsK, ltK, kind, beta)
        else:
            lsK = zsK - zs.logsumexp(-1, keepdim=True)
            ltK = ztK - zt.logsumexp(-1, keepdim=True)
            t = terms(lsK, ltK, kind, beta)
            if tail == "bucket" and K.shape[1] < zs.shape[1]:
                in_k = torch.zeros_like(zs, dtype=torch.bool).scatter(1, K, True)
                ninf = float("-inf")
                ls_tail = zs.masked_fill(in_k, ninf).logsumexp(-1, keepdim=True) - zs.logsumexp(-1, keepdim=True)
                lt_tail = zt.masked_fill(in_k, ninf).logsumexp(-1, keepdim=True) - zt.logsumexp(-1, keepdim=True)
                t = torch.cat([t, terms(ls_tail, lt_tail, kind, beta)], 1)
    if term_clip is not None:
        t = t.clamp(max=term_clip)
    return t.sum(-1)


def logprobs(x, w, ids, temperature=1.0, logit_scale=1.0, softcap=None):
    z = logits(x, w, temperature, logit_scale, softcap)
    ls = z.log_softmax(-1)
    ent = -(ls.exp() * ls).sum(-1)
    return ls.gather(1, ids[:, None])[:, 0], ent, z.logsumexp(-1)


def topk(x, w, k, temperature=1.0, logit_scale=1.0, softcap=None):
    """``(ids[N, k], logprobs[N, k], lse[N])`` of the k largest logits per token, descending (ties: any order)."""
    z = logits(x, w, temperature, logit_scale, softcap)
    lse = z.logsumexp(-1)
    vals, ids = z.topk(k, dim=-1)
    return ids, vals - lse[:, None], lse


# ----------------------------------------------------------------------------- gradients (through autograd)


def _spec_kwargs(logit):
    return dict(temperature=logit.temperature, logit_scale=logit.logit_scale, softcap=logit.softcap)


def logprobs_grads(x, w, ids, logit, g, dtype=torch.float64):
    """``((logprobs, entropy, lse), d_x, d_w)`` on the CPU with the gradients of ``sum_i g[i] * out[i]``
    (``g``: three per-token weights or None) through autograd; ``logit`` is a ``LogitSpec``.  float64 is the
    ground truth; float32 is the plain PyTorch computation the error-relative criterion compares against."""
    xd = x.detach().to(dtype).cpu().requires_grad_()
    wd = w.detach().to(dtype).cpu().requires_grad_()
    lp, ent, lse = logprobs(xd, wd, ids.cpu(), **_spec_kwargs(logit))
    total = sum((gi.to(dtype).cpu() * t).sum() for gi, t in zip(g, (lp, ent, lse)) if gi is not None)
    dx, dw = torch.autograd.grad(total, (xd, wd))
    return (lp.detach(), ent.detach(), lse.detach()), dx, dw


def divergence_grads(xs, ws, xt, wt, logit, div, topk_ids, token_grad, dtype=torch.float64):
    """Per-token loss (CPU) and the student gradients of ``sum(token_grad * loss)`` through autograd, every
    input cast to ``dtype`` (float64: the ground truth; float32: the plain PyTorch computation);
    ``logit`` / ``div`` are a ``LogitSpec`` / ``DivergenceSpec``."""
    xd = xs.detach().to(dtype).cpu().requires_grad_()
    wd = ws.detach().to(dtype).cpu().requires_grad_()
    loss = divergence(xd, wd, xt.detach().to(dtype).cpu(), wt.detach().to(dtype).cpu(), kind=div.kind, beta=div.beta,
                      support=div.support, topk_ids=None if topk_ids is None else topk_ids.cpu(), tail=div.tail,
                      term_clip=div.term_clip, **_spec_kwargs(logit))
    dx, dw = torch.autograd.grad((loss * token_grad.to(dtype).cpu()).sum(), (xd, wd))
    return loss.detach(), dx, dw


# ----------------------------------------------------------------------------- attention


def attention(q, k, v, pk, pv, scale, seq_lens, dtype=torch.float64):
    """Materialised cascade attention in ``dtype``: every query sees the whole prefix ``pk``/``pv`` [P, Hkv, D]
    and its own keys ``0..s`` below ``seq_lens``; returns ``o [B, S, Hq, D]`` and ``lse [B, Hq, S]`` (natural
    log, scale folded in; padded rows give ``o = 0``, ``lse = -inf``)."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    p = pk.shape[0]
    q, k, v, pk, pv = (t.to(dtype) for t in (q, k, v, pk, pv))
    keys = torch.cat([pk.unsqueeze(0).expand(b, p, hkv, d), k], dim=1).repeat_interleave(g, dim=2)
    vals = torch.cat([pv.unsqueeze(0).expand(b, p, hkv, d), v], dim=1).repeat_interleave(g, dim=2)
    scores = torch.einsum("bshd,bthd->bhst", q, keys) * scale  # [B, Hq, S, P+S]
    pos = torch.arange(s, device=q.device)
    allowed = torch.ones(b, s, p + s, dtype=torch.bool, device=q.device)
    allowed[:, :, p:] = pos[None, :] <= pos[:, None]
    lens = torch.full((b,), s, device=q.device) if seq_lens is None else seq_lens.to(q.device)
    key_ok = torch.cat([torch.ones(b, p, dtype=torch.bool, device=q.device), pos[None] < lens[:, None]], 1)
    allowed &= key_ok[:, None, :]
    row_ok = pos[None] < lens[:, None]  # [B, S]
    allowed &= row_ok[:, :, None]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked (padded) rows -> 0
    o = torch.einsum("bhst,bthd->bshd", probs, vals)
    return o, lse


def merge_attention_states(o_a, lse_a, o_b, lse_b):
    """The textbook merge in float64: ``lse = logaddexp(lse_a, lse_b)``, ``o = sum_x exp(lse_x - lse) o_x``
    (``o [B, S, H, D]``, ``lse [B, H, S]``; rows empty on both sides give ``o = 0``)."""
    la, lb = lse_a.double(), lse_b.double()
    lse = torch.logaddexp(la, lb)
    wa = torch.exp(la - lse).nan_to_num(0.0).transpose(1, 2).unsqueeze(-1)
    wb = torch.exp(lb - lse).nan_to_num(0.0).transpose(1, 2).unsqueeze(-1)
    return wa * o_a.double() + wb * o_b.double(), lse
