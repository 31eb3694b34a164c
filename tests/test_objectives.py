"""Each objective's loss and gradient against a direct PyTorch formula on full logits (float64)."""

import math

import pytest
import torch

from copsd.backends import available_backends
from copsd.objectives import (
    PaperParams,
    divergence_loss,
    fused_paper_loss,
    group_outcome_zscore,
    group_token_zscore,
    k3_kl,
    paper_loss,
    sampled_logprobs,
    token_rewards,
)

T, H, V = 23, 12, 37


def _batch(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(T, H, generator=g, dtype=dtype)
    ws = torch.randn(V, H, generator=g, dtype=dtype) * 0.5
    ht = torch.randn(T, H, generator=g, dtype=dtype)
    wt = torch.randn(V, H, generator=g, dtype=dtype) * 0.5
    ids = torch.randint(0, V, (T,), generator=g)
    mask = torch.rand(T, generator=g) > 0.25
    mask[0] = True
    group = torch.tensor([0] * 8 + [1] * 9 + [2] * 6)
    return hs, ws, ht, wt, ids, mask, group


def _ref_logp(h, w, ids, temp=1.0):
    return torch.log_softmax(h @ w.T / temp, -1).gather(1, ids[:, None])[:, 0]


def test_rewards_and_zscore_match_loops():
    hs, ws, ht, wt, ids, mask, group = _batch()
    lt, ls = _ref_logp(ht, wt, ids), _ref_logp(hs, ws, ids)
    r = token_rewards(lt, ls, mask, -0.5, 0.7, 0.02)
    adv = group_token_zscore(r, group, mask)
    for t in range(T):
        want = min(max(float(lt[t] - ls[t]), -0.5), 0.7) + 0.02 if mask[t] else 0.0
        assert math.isclose(float(r[t]), want, rel_tol=1e-6, abs_tol=1e-6)
    for gi in range(3):
        sel = (group == gi) & mask
        vals = r[sel].double()
        want = (vals - vals.mean()) / (vals.std() + 1e-6)
        torch.testing.assert_close(adv[sel].double(), want, rtol=1e-5, atol=1e-5)
    assert (adv[~mask] == 0).all()


def test_zscore_single_token_group_is_zero_not_nan():
    r = torch.tensor([1.0, 2.0, 3.0])
    adv = group_token_zscore(r, torch.tensor([0, 1, 1]), torch.tensor([True, True, True]))
    assert adv[0] == 0 and torch.isfinite(adv).all() and adv[1] < 0 < adv[2]


def _ppo_reference(logp, old, adv, mask, eps, dual):
    """Per-token, written as the case analysis of the dual-clip PPO objective."""
    terms = []
    for t in range(T):
        if not mask[t]:
            continue
        ratio = torch.exp(logp[t] - old[t])
        a = adv[t]
        surr = torch.minimum(ratio * a, torch.clamp(ratio, 1 - eps, 1 + eps) * a)  # PPO maximises this
        if a < 0:
            surr = torch.maximum(surr, dual * a)  # dual clip bounds the loss at -dual * a
        terms.append(-surr)
    return torch.stack(terms)


@pytest.mark.parametrize("with_ref", [True, False])
def test_paper_loss_and_grad(with_ref):
    hs, ws, ht, wt, ids, mask, group = _batch(1)
    params = PaperParams(kl_coef=0.05)
    g = torch.Generator().manual_seed(3)
    # rollout log-probs: the sampler's, perturbed so ratios span the clip regions
    with torch.no_grad():
        old = _ref_logp(hs, ws, ids) + torch.randn(T, generator=g, dtype=torch.float64) * 1.5
        ref = _ref_logp(hs, ws, ids) + torch.randn(T, generator=g, dtype=torch.float64) * 0.3
        teacher = _ref_logp(ht, wt, ids)
        adv = group_token_zscore(token_rewards(teacher, old, mask), group, mask).double()
    normalizer = float(mask.sum()) + 3.0  # e.g. tokens of other micro-batches in the same step

    hs1, ws1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    lp, _ = sampled_logprobs(hs1, ws1, ids, backend="reference")
    loss, stats = paper_loss(lp, old, adv, mask, normalizer, ref_logp=ref if with_ref else None, params=params)
    loss.backward()

    hs2, ws2 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    lp2 = _ref_logp(hs2, ws2, ids)
    want = _ppo_reference(lp2, old, adv, mask, 0.2, 3.0).sum()
    if with_ref:
        d = ref[mask] - lp2[mask]
        want = want + 0.05 * (torch.exp(d) - d - 1).sum()
    want = want / normalizer
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(hs1.grad, hs2.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(ws1.grad, ws2.grad, rtol=1e-5, atol=1e-8)
    assert (hs1.grad[~mask] == 0).all()
    # the perturbation must exercise both clip regions, or this test proves little
    assert stats["clip_sum"] > 0 and stats["dual_clip_sum"] > 0
    # the same loss with the gradient taken inside the fused op (the trainer's path)
    backends = ["reference"] + (["cpu"] if "cpu" in available_backends() else [])
    for backend in backends:
        hs3, ws3 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        loss3, stats3, lp3, _ = fused_paper_loss(hs3, ws3, ids, old, adv, mask, normalizer,
                                                 ref_logp=ref if with_ref else None, params=params, backend=backend)
        loss3.backward()
        torch.testing.assert_close(loss3, want.detach(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(hs3.grad, hs2.grad, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(ws3.grad, ws2.grad, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(lp3, lp.detach(), rtol=1e-9, atol=1e-12)
        for k in stats:
            torch.testing.assert_close(stats3[k], stats[k])


def test_paper_loss_masked_garbage_is_not_nan():
    lp = torch.tensor([-1.0, float("inf"), -2.0], requires_grad=True)
    old = torch.tensor([-1.1, -float("inf"), -2.0])
    mask = torch.tensor([True, False, True])
    loss, _ = paper_loss(lp, old, torch.tensor([1.0, 5.0, -1.0]), mask, 2.0, ref_logp=torch.tensor([-1.0, 0.0, -2.0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all() and lp.grad[1] == 0


def test_k3_nonnegative_and_zero_at_equality():
    a = torch.randn(100)
    b = torch.randn(100)
    assert (k3_kl(a, b) >= -1e-7).all() and torch.allclose(k3_kl(a, a), torch.zeros(100))


def test_k3_clamp_value_and_gradient():
    ref = torch.zeros(5, dtype=torch.float64)
    # ref - logp = d: k3(d) = e^d - d - 1; d = 4 gives 49.6, d = -12 gives 11.0, both above 10
    logp = torch.tensor([0.0, -0.5, 1.0, -4.0, 12.0], dtype=torch.float64, requires_grad=True)
    d = ref - logp.detach()
    raw = torch.exp(d) - d - 1
    for clamp in (10.0, 2.0, None):
        logp.grad = None
        k = k3_kl(logp, ref, clamp)
        want = raw if clamp is None else raw.clamp(max=clamp)
        torch.testing.assert_close(k, want, rtol=0, atol=1e-12)
        k.sum().backward()
        grad = 1 - torch.exp(d)                         # d k3 / d logp
        if clamp is not None:
            grad = torch.where(raw > clamp, torch.zeros_like(grad), grad)
        torch.testing.assert_close(logp.grad, grad, rtol=1e-12, atol=1e-12)
    assert k3_kl(logp, ref).max() == 10.0                     # the default clamp is the reference's 10
    assert (raw > 10).sum() == 2 and (raw[:3] < 2).all()      # the cases above do hit and miss the clamp


def test_paper_loss_kl_clamp_param():
    lp = torch.tensor([-1.0, -20.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([True, True])
    zero = torch.zeros(2, dtype=torch.float64)
    loss, stats = paper_loss(lp, lp.detach(), zero, mask, 1.0, ref_logp=ref, params=PaperParams(kl_coef=1.0))
    assert float(stats["kl_sum"]) == pytest.approx(10.0) and float(loss.detach()) == pytest.approx(10.0)
    loss.backward()
    assert lp.grad[1] == 0
    _, stats = paper_loss(lp, lp.detach(), zero, mask, 1.0, ref_logp=ref,
                          params=PaperParams(kl_coef=1.0, kl_clamp=None))
    assert float(stats["kl_sum"]) == pytest.approx(math.exp(19) - 19 - 1)


def test_group_outcome_zscore_matches_loop():
    g = torch.Generator().manual_seed(5)
    scores = torch.rand(11, generator=g, dtype=torch.float64)
    group = torch.tensor([3, 3, 3, 3, 7, 7, 7, 9, 1, 1, 1])
    scores[8:] = 0.4                                        # a group whose answers all scored the same
    adv = group_outcome_zscore(scores, group)
    for gid in group.unique():
        sel = group == gid
        x = scores[sel] - scores[sel][0]                    # z-scores do not change under a shift
        want = torch.zeros_like(x) if len(x) < 2 else (x - x.mean()) / (x.std() + 1e-6)
        torch.testing.assert_close(adv[sel], want, rtol=1e-12, atol=1e-12)
    assert adv[7] == 0 and (adv[8:] == 0).all()             # single answer; all equal
    assert group_outcome_zscore(torch.zeros(0), torch.zeros(0, dtype=torch.long)).numel() == 0


def _div_reference(kind, hs, ws, ht, wt, mask, beta=0.5, k=None, temp=1.0):
    lq = torch.log_softmax(hs @ ws.T / temp, -1)
    lp = torch.log_softmax(ht @ wt.T / temp, -1)
    if kind == "reverse_kl":
        per = (lq.exp() * (lq - lp)).sum(-1)
    elif kind == "jsd":
        q, p = lq.exp(), lp.exp()
        m = (1 - beta) * q + beta * p
        per = beta * (p * (lp - m.log())).sum(-1) + (1 - beta) * (q * (lq - m.log())).sum(-1)
    elif kind == "topk":
        top = lp.topk(k, dim=-1).indices
        qk, pk = lq.exp().gather(1, top), lp.exp().gather(1, top)
        qb = torch.cat([qk, (1 - qk.sum(-1, keepdim=True)).clamp_min(1e-30)], -1)
        pb = torch.cat([pk, (1 - pk.sum(-1, keepdim=True)).clamp_min(1e-30)], -1)
        per = (qb * (qb.log() - pb.log())).sum(-1)
    return torch.where(mask, per, torch.zeros_like(per))


@pytest.mark.parametrize("objective", ["reverse_kl", "jsd", "topk"])
@pytest.mark.parametrize("temp", [1.0, 0.7])
def test_divergence_loss_and_grad(objective, temp):
    hs, ws, ht, wt, ids, mask, _ = _batch(2)
    ref = _ref_logp(hs, ws, ids).detach() + 0.1
    normalizer = float(mask.sum())
    hs1, ws1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    lp, _ = sampled_logprobs(hs1, ws1, ids, temperature=temp, backend="reference")
    loss, stats = divergence_loss(objective, hs1, ws1, ht, wt, mask, normalizer, logp=lp, ref_logp=ref,
                                  kl_coef=0.01, beta=0.3, topk=5, temperature=temp, backend="reference")
    loss.backward()
    hs2, ws2 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    per = _div_reference(objective, hs2, ws2, ht, wt, mask, beta=0.3, k=5, temp=temp)
    lp2 = _ref_logp(hs2, ws2, ids, temp)
    d = ref - lp2
    k3 = (torch.exp(d) - d - 1).clamp(max=10.0)  # the default k3 clamp (hit here at temperature 0.7)
    want = (per.sum() + 0.01 * torch.where(mask, k3, torch.zeros_like(d)).sum()) / normalizer
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(hs1.grad, hs2.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(ws1.grad, ws2.grad, rtol=1e-5, atol=1e-8)
    assert float(stats["divergence_sum"]) > 0


def test_divergence_teacher_gets_no_gradient_and_unknown_objective():
    hs, ws, ht, wt, ids, mask, _ = _batch(4)
    ht = ht.clone().requires_grad_()
    loss, _ = divergence_loss("reverse_kl", hs.requires_grad_(), ws, ht, wt, mask, 1.0, backend="reference")
    loss.backward()
    assert ht.grad is None or (ht.grad == 0).all()
    with pytest.raises(ValueError, match="objective must be one of"):
        divergence_loss("forward", hs, ws, ht, wt, mask, 1.0)
