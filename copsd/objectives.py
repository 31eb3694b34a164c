"""Stage-2 objectives on packed response tokens.

All tensors are packed over the response tokens of a micro-batch (``[T]`` or ``[T, H]``).  Each loss
is a *sum* over valid tokens divided by ``normalizer`` (the number of valid tokens in the whole
optimizer step, over all micro-batches and processes), so that the micro-batch losses add up to
the token-mean of docs/method.md however the step is split.

* ``paper``: r = clip(log pi_T(y) - log pi_S^rollout(y), low, high) + bonus on the sampled token;
  A = per-group token z-score of r; PPO clipped surrogate with dual clip; + kl_coef * k3 KL to the
  initial student (k3 clamped at ``kl_clamp``, 10 by default as in the reference implementation).
* ``hybrid`` rows marked for the judge: one outcome reward per sampled answer (the judge's score),
  A = per-group z-score of the G answers' rewards (:func:`group_outcome_zscore`) broadcast to every token
  of the answer, then the same PPO dual-clip loss and k3 KL as ``paper``.
* ``reverse_kl`` / ``topk`` / ``jsd``: a divergence per token between the student and teacher
  next-token distributions, computed by :func:`copsd.ops.linear_divergence` from hidden states and
  lm_head weights (never full logits); + the same optional k3 KL term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from copsd.ops import linear_divergence, linear_logprobs, linear_logprobs_loss

_LOG_RATIO_CLAMP = 20.0


def _f(x):
    """fp32 at least (float64 inputs stay float64, for reference checks)."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass(frozen=True)
class PaperParams:
    reward_clip_low: float = -3.0
    reward_clip_high: float = 5.0
    reward_bonus: float = 0.02
    epsilon: float = 0.2
    epsilon_high: float | None = None
    dual_clip: float = 3.0
    kl_coef: float = 0.005
    kl_clamp: float | None = 10.0


# --------------------------------------------------------------------------- paper (sampled-token)

def token_rewards(teacher_logp, rollout_logp, mask, low=-3.0, high=5.0, bonus=0.02):
    """Per-token reward on the sampled token; 0 on masked tokens."""
    r = (_f(teacher_logp) - _f(rollout_logp)).clamp(low, high) + bonus
    return torch.where(mask, r, torch.zeros_like(r))


def group_token_zscore(rewards, group, mask, eps=1e-6):
    """A = (r - mean_g) / (std_g + eps), pooling all valid tokens of the G rollouts of each prompt.

    ``group`` ``[T]`` holds each token's prompt-group id.  ``std`` is the unbiased sample std (as
    ``torch.std``); a group with fewer than two valid tokens gets A = 0.  Masked tokens get 0.
    """
    r = torch.where(mask, _f(rewards), torch.zeros_like(_f(rewards)))
    gid = torch.unique(group, return_inverse=True)[1]
    n_groups = int(gid.max()) + 1 if gid.numel() else 0
    m = mask.to(r.dtype)
    count = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(0, gid, m)
    total = torch.zeros_like(count).index_add_(0, gid, r)
    mean = total / count.clamp_min(1)
    dev = torch.where(mask, r - mean[gid], torch.zeros_like(r))
    var = torch.zeros_like(count).index_add_(0, gid, dev * dev) / (count - 1).clamp_min(1)
    std = var.sqrt()
    adv = dev / (std[gid] + eps)
    ok = (count[gid] > 1) & mask
    return torch.where(ok, adv, torch.zeros_like(adv))


def k3_kl(logp, ref_logp, clamp: float | None = 10.0):
    """k3 estimator of KL(pi || pi_ref) per sampled token: e^(ref-logp) - (ref-logp) - 1 (>= 0), clamped at
    ``clamp`` (``None``: no clamp).  Beyond the clamp a token contributes a constant and no gradient, which
    keeps one very unlikely token from dominating the step; the reference implementation clamps at 10."""
    d = (_f(ref_logp) - _f(logp)).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    k3 = torch.exp(d) - d - 1
    return k3 if clamp is None else k3.clamp(max=clamp)


def group_outcome_zscore(scores, group, eps=1e-6):
    """Outcome-level GRPO advantage: ``(s - mean_g) / (std_g + eps)`` over the answers of each prompt group.

    ``scores`` ``[N]`` holds one reward per answer and ``group`` ``[N]`` its prompt-group id; ``std`` is the
    unbiased sample std (as ``torch.std``).  A group with a single answer gets 0 (no baseline to compare
    against); a group whose answers all scored the same gets 0.  Broadcast the result to an answer's tokens.
    """
    gid = torch.unique(group, return_inverse=True)[1]
    n_groups = int(gid.max()) + 1 if gid.numel() else 0
    # shift each group by its first score: a group whose answers all scored the same gets exactly 0
    pos = torch.arange(gid.numel(), device=gid.device)
    first = torch.full((n_groups,), gid.numel(), device=gid.device).scatter_reduce_(0, gid, pos, "amin")
    s = _f(scores)
    s = s - s[first][gid]
    count = torch.zeros(n_groups, dtype=s.dtype, device=s.device).index_add_(0, gid, torch.ones_like(s))
    mean = torch.zeros_like(count).index_add_(0, gid, s) / count.clamp_min(1)
    dev = s - mean[gid]
    var = torch.zeros_like(count).index_add_(0, gid, dev * dev) / (count - 1).clamp_min(1)
    adv = dev / (var.sqrt()[gid] + eps)
    return torch.where(count[gid] > 1, adv, torch.zeros_like(adv))


def ppo_dual_clip(logp, old_logp, adv, mask, epsilon=0.2, epsilon_high=None, dual_clip=3.0):
    """Per-token PPO loss with ratio clip and dual clip for negative advantages (0 on masked tokens).

    Returns ``(loss[T], clipped[T] bool, dual_clipped[T] bool)``.
    """
    eps_hi = epsilon if epsilon_high is None else epsilon_high
    log_ratio = _f(logp) - _f(old_logp)
    log_ratio = torch.where(mask, log_ratio, torch.zeros_like(log_ratio))
    ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - epsilon, 1 + eps_hi)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = (clipped > unclipped) & mask
    dual_bound = -adv * dual_clip
    dual = (adv < 0) & (loss > dual_bound) & mask
    loss = torch.where(adv < 0, torch.minimum(loss, dual_bound), loss)
    return torch.where(mask, loss, torch.zeros_like(loss)), was_clipped, dual


def paper_terms(logp, old_logp, adv, mask, ref_logp=None, params: PaperParams = PaperParams()):
    """Per-token PPO dual-clip loss (+ kl_coef * k3), 0 on masked tokens; ``(loss[T], stats)`` with ``stats``
    token sums (detached) for logging.  ``logp`` carries the gradient; the others are constants."""
    pg, clipped, dual = ppo_dual_clip(logp, old_logp.detach(), adv.detach(), mask, params.epsilon,
                                      params.epsilon_high, params.dual_clip)
    per = pg
    stats = {"pg_loss_sum": pg.detach().sum(), "clip_sum": clipped.sum().float(),
             "dual_clip_sum": dual.sum().float()}
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp.detach(), params.kl_clamp)
        kl = torch.where(mask, kl, torch.zeros_like(kl))
        stats["kl_sum"] = kl.detach().sum()
        if params.kl_coef:
            per = per + params.kl_coef * kl
    return per, stats


def paper_loss(logp, old_logp, adv, mask, normalizer, ref_logp=None, params: PaperParams = PaperParams()):
    """Token-sum of the PPO dual-clip loss (+ kl_coef * k3) divided by ``normalizer``; ``(loss, stats)``."""
    per, stats = paper_terms(logp, old_logp, adv, mask, ref_logp, params)
    return per.sum() / normalizer, stats


def fused_paper_loss(hidden, weight, ids, old_logp, adv, mask, normalizer, ref_logp=None,
                     params: PaperParams = PaperParams(), *, temperature=1.0, logit_scale=1.0, softcap=None,
                     backend="auto"):
    """:func:`paper_loss` of the student's log-probs of ``ids`` straight from hidden states and the lm_head,
    through :func:`copsd.ops.linear_logprobs_loss` (gradient in the forward pass: 3 lm_head GEMMs instead of
    4).  Returns ``(loss, stats, logp, entropy)`` with ``logp`` / ``entropy`` detached, for logging."""
    old_logp, adv = old_logp.detach(), adv.detach()
    ref = ref_logp.detach() if ref_logp is not None else None

    def per_token(lp, ent, rows):
        per, _ = paper_terms(lp, old_logp[rows], adv[rows], mask[rows], None if ref is None else ref[rows], params)
        return per / normalizer

    loss, logp, ent = linear_logprobs_loss(hidden, weight, ids, per_token, temperature=temperature,
                                           logit_scale=logit_scale, softcap=softcap, backend=backend)
    _, stats = paper_terms(logp, old_logp, adv, mask, ref, params)
    return loss, stats, logp, ent


# --------------------------------------------------------------------------- divergence objectives

def divergence_terms(objective, student_hidden, student_weight, teacher_hidden, teacher_weight, mask, *,
                     beta=0.5, topk=50, temperature=1.0, logit_scale=1.0, softcap=None, backend="auto",
                     reduction="none", stats_ids=None):
    """Divergence for ``reverse_kl`` / ``topk`` / ``jsd``: per token ``[T]`` (0 on masked tokens) with
    ``reduction="none"``, or their sum with ``reduction="sum"``.  With ``stats_ids``: ``(divergence,
    DivergenceStats)``, the token statistics of ``linear_divergence(..., stats_ids=)``."""
    kw = dict(temperature=temperature, logit_scale=logit_scale, softcap=softcap, mask=mask, reduction=reduction,
              backend=backend)
    if stats_ids is not None:
        kw["stats_ids"] = stats_ids
    if objective == "reverse_kl":
        return linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                 kind="reverse_kl", **kw)
    if objective == "topk":
        k = min(int(topk), student_weight.shape[0])
        return linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                 kind="reverse_kl", support="teacher_topk", topk=k, tail="bucket", **kw)
    if objective == "jsd":
        return linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                 kind="jsd", beta=beta, **kw)
    raise ValueError(f"objective must be one of 'paper', 'reverse_kl', 'topk', 'jsd', got {objective!r}")


def divergence_loss(objective, student_hidden, student_weight, teacher_hidden, teacher_weight, mask, normalizer,
                    *, logp=None, ref_logp=None, kl_coef=0.0, kl_clamp=10.0, stats_ids=None, **kw):
    """Token-sum of the divergence (+ kl_coef * k3 on the sampled tokens) divided by ``normalizer``; ``(loss, stats)``.

    ``stats_ids`` (the sampled tokens): ``stats["token_stats"]`` is then the op's ``DivergenceStats`` -- the
    student's log-probs and entropy and the teacher's log-probs of those ids from the logits the divergence
    forms anyway, detached, under the op's one logit transform (``logit_scale`` / ``softcap`` /
    ``temperature``, applied to both sides).  Without ``logp`` the k3 KL metric then reads the student's
    log-probs from them; they carry no gradient, so ``kl_coef`` must be 0 there (pass ``logp`` instead)."""
    if stats_ids is not None and logp is None and kl_coef and ref_logp is not None:
        raise ValueError("kl_coef: the k3 KL term needs the student's log-probs with their gradient (logp=); "
                         "stats_ids' log-probs are detached")
    # A scalar (sum) reduction lets the op compute the gradient in its forward pass: on GPU that is
    # 4 lm_head-sized GEMMs per step instead of 6 for a per-token loss with a recomputing backward.
    total = divergence_terms(objective, student_hidden, student_weight, teacher_hidden, teacher_weight, mask,
                             reduction="sum", stats_ids=stats_ids, **kw)
    stats = {}
    if stats_ids is not None:
        total, stats["token_stats"] = total
        if logp is None:
            logp = stats["token_stats"].student_logprobs
    stats["divergence_sum"] = total.detach()
    if ref_logp is not None and logp is not None:
        kl = k3_kl(logp, ref_logp.detach(), kl_clamp)
        kl = torch.where(mask, kl, torch.zeros_like(kl))
        stats["kl_sum"] = kl.detach().sum()
        if kl_coef:
            total = total + kl_coef * kl.sum()
    return total / normalizer, stats


def sampled_logprobs(hidden, weight, ids, *, temperature=1.0, logit_scale=1.0, softcap=None, entropy=False,
                     backend="auto"):
    """log pi(ids) (and the token entropy) from hidden states and the lm_head, via the fused op."""
    lp, ent, _ = linear_logprobs(hidden, weight, ids, temperature=temperature, logit_scale=logit_scale,
                                 softcap=softcap, return_entropy=entropy, backend=backend)
    return lp, ent
