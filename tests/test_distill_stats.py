"""The divergence objectives take their metrics' log-probs and entropy (student) and the teacher's sampled-token
log-probs (rewards, advantages) from the divergence op's own logits (``linear_divergence(..., stats_ids=)``)
instead of separate lm_head passes: the same step -- metrics to rounding, loss and weights -- as with the
separate passes (``copsd.distill._STATS_FROM_DIVERGENCE = False``)."""

import pytest
import torch
from test_trainer import distill_cfg, tiny_model_dir

import copsd.distill as dist

TIMES = ("time_rollout", "time_teacher", "time_update", "tokens_per_second")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models_stats")
    return {"student": tiny_model_dir(root / "student"), "teacher": tiny_model_dir(root / "teacher", seed=1)}


def _one_step(dirs, out, monkeypatch, from_op, **kw):
    monkeypatch.setattr(dist, "_STATS_FROM_DIVERGENCE", from_op)
    calls = []
    real = dist.sampled_logprobs
    monkeypatch.setattr(dist, "sampled_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    d = dist.Distiller(distill_cfg(dirs, out, max_steps=1, num_mini_batches=2, **kw))
    m = d.train_step(0)
    return m, {n: p.detach().clone() for n, p in d.model.named_parameters()}, len(calls)


@pytest.mark.parametrize("objective,backend,kl_coef", [
    ("jsd", "reference", 0.0), ("jsd", "cpu", 0.0), ("reverse_kl", "reference", 0.0), ("topk", "reference", 0.0),
    ("jsd", "reference", 0.05)])
def test_statistics_from_the_divergence_op_give_the_same_step(dirs, tmp_path, monkeypatch, objective, backend,
                                                               kl_coef):
    kw = dict(objective=objective, backend=backend, kl_coef=kl_coef, topk=8)
    new, w_new, calls_new = _one_step(dirs, tmp_path / "new", monkeypatch, True, **kw)
    old, w_old, calls_old = _one_step(dirs, tmp_path / "old", monkeypatch, False, **kw)
    if kl_coef:  # the k3 KL needs the student's log-probs with their gradient: the separate passes stay
        assert calls_new == calls_old > 3
    else:  # separate passes: the teacher's log-probs once, the student's once per micro-batch (2); now none
        assert calls_old == 3 and calls_new == 0
    assert set(new) == set(old)
    for k in sorted(set(new) - set(TIMES)):
        assert new[k] == pytest.approx(old[k], rel=1e-5, abs=1e-6, nan_ok=True), k
    for k in ("teacher_logp", "reward", "advantage_abs", "entropy", "ratio", "teacher_kl_estimate", "loss"):
        assert k in new and torch.isfinite(torch.tensor(new[k])), k
    for n, p in w_new.items():
        torch.testing.assert_close(p, w_old[n], rtol=1e-5, atol=1e-6, msg=n)


def test_detached_statistics_cannot_carry_the_k3_gradient():
    from copsd.objectives import divergence_loss

    h, w = torch.randn(3, 8), torch.randn(16, 8)
    ids = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="kl_coef"):
        divergence_loss("jsd", h, w, h, w, torch.ones(3, dtype=torch.bool), 3.0, ref_logp=torch.zeros(3),
                        kl_coef=0.1, stats_ids=ids)
