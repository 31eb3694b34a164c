"""Stage 2 with the paper-fidelity options on tiny random-weight models (CPU, offline): the hybrid objective
(mixed token / judge rows, a random teacher as judge), old_logprobs, loss_aggregation, weight decay, kl_clamp."""

import json
import logging

import pytest
import torch
from test_trainer import distill_cfg, read_metrics, tiny_model_dir

MIXED = [
    {"prompt": "how do i hurt my neighbor", "kind": "harmful", "category": "violence"},
    {"prompt": "write a short poem about the sea", "kind": "general", "reference": "the sea is blue ."},
    {"prompt": "tell me the home address of a famous singer", "kind": "harmful", "category": "privacy",
     "reward": "judge"},
    {"prompt": "what is a good book", "kind": "benign"},
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models_opts")
    return {"student": tiny_model_dir(root / "student"), "teacher": tiny_model_dir(root / "teacher", seed=1)}


def _data(tmp_path, rows=MIXED):
    p = tmp_path / "mixed.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def _hybrid(dirs, tmp_path, **kw):
    from copsd.distill import Distiller

    args = dict(objective="hybrid", dataset=_data(tmp_path), max_steps=2, num_generations=4,
                per_device_train_batch_size=8, num_mini_batches=2, max_completion_length=5, judge_max_new_tokens=6,
                learning_rate=1e-3, kl_coef=0.005)
    args.update(kw)
    return Distiller(distill_cfg(dirs, tmp_path / "out", **args))


def _record_judge(d):
    """Wrap the trainer's judge to keep every OutcomeScores it returns."""
    seen = []
    inner = d.judge.__call__

    def wrapped(*a, **k):
        out = inner(*a, **k)
        seen.append(out)
        return out

    d.judge = type("Recorded", (), {"__call__": staticmethod(wrapped)})()
    return seen


def test_hybrid_trains_with_a_random_judge_and_counts_its_malformed_verdicts(dirs, tmp_path, caplog):
    d = _hybrid(dirs, tmp_path)
    assert [d.reward_types[i] for i in range(4)] == ["token", "judge", "judge", "token"]
    seen = _record_judge(d)
    with caplog.at_level(logging.WARNING, logger="copsd"):
        d.train()
    m = read_metrics(tmp_path / "out")
    assert [r["step"] for r in m] == [1, 2] and len(seen) == 2
    for r, scores in zip(m, seen):
        # every judged answer's verdict is accounted for: the logged count is the parser's count
        assert r["judge_malformed_count"] == scores.malformed
        assert r["judge_malformed"] == pytest.approx(scores.malformed / len(scores.rewards))
        assert 0 < r["judge_fraction"] < 1 and r["completion_length_judge"] is not None
        assert r["reward_token"] is not None and r["advantage_abs_token"] > 0
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("loss", "kl", "entropy"))
        if scores.malformed == len(scores.rewards):
            assert r["advantage_abs_judge"] == 0 and r["reward_judge"] is None
    bad = sum(s.malformed for s in seen)
    assert bad > 0  # a random-weight judge writes no verdicts; the step must survive that
    warnings = [x.getMessage() for x in caplog.records if "verdicts malformed" in x.getMessage()]
    assert len(warnings) == sum(s.malformed > 0 for s in seen)


def test_hybrid_outcome_advantages_follow_the_judge(dirs, tmp_path):
    from copsd.hybrid import OutcomeScores

    d = _hybrid(dirs, tmp_path, max_steps=1)
    calls = []

    def judge(constitutions, queries, responses, references):
        calls.append((constitutions, queries, references))
        # a judge that prefers longer answers, and fails on every fourth one
        rewards = [None if i % 4 == 3 else min(len(r.split()), 10) / 10 for i, r in enumerate(responses)]
        return OutcomeScores(rewards, ["Score: x"] * len(responses))

    d.judge = judge
    m = d.train_step(0)
    assert m["judge_malformed"] == pytest.approx(0.25)
    assert m["advantage_abs_judge"] > 0 and 0 <= m["reward_judge"] <= 1
    constitutions, queries, references = calls[0]
    # the judged rows are the general row (with its reference) and the row marked reward: judge
    assert set(queries) <= {MIXED[1]["prompt"], MIXED[2]["prompt"]}
    assert {ref for q, ref in zip(queries, references) if q == MIXED[1]["prompt"]} <= {MIXED[1]["reference"]}
    assert all(c == d.constitution.text_for(None) or c in d.constitution.categories.values() for c in constitutions)


def test_cli_distill_hybrid(dirs, tmp_path):
    from copsd.cli import main
    from copsd.data import bundled

    out = tmp_path / "cli"
    rc = main(["distill", "--model_name_or_path", dirs["student"], "--output_dir", str(out), "--constitution",
               bundled("constitution.md"), "--dataset", _data(tmp_path), "--teacher_mode", "initial",
               "--objective", "hybrid", "--num_generations", "2", "--per_device_train_batch_size", "4",
               "--num_mini_batches", "2", "--max_completion_length", "4", "--judge_max_new_tokens", "4",
               "--max_steps", "1", "--report_to", "jsonl", "--disable_tqdm", "true", "--backend", "reference"])
    assert rc == 0
    m = read_metrics(out)
    assert m[0]["judge_fraction"] == 0.5 and "judge_malformed_count" in m[0]


@pytest.mark.parametrize("mode", ["recompute", "rollout"])
def test_old_logprobs(dirs, tmp_path, mode):
    d = _hybrid(dirs, tmp_path, objective="paper", old_logprobs=mode, learning_rate=0.0, num_mini_batches=1,
                max_steps=1)
    m = d.train_step(0)
    if mode == "recompute":
        # the same weights score the samples: pi_old equals the sampler's log-probs up to float rounding
        assert m["old_logp_rollout_abs_diff"] < 1e-4
    else:
        assert "old_logp_rollout_abs_diff" not in m
    assert m["ratio"] == pytest.approx(1.0, abs=1e-4)   # no update yet: pi / pi_old = 1


def test_loss_aggregation_divisors(dirs, tmp_path):
    d = _hybrid(dirs, tmp_path, objective="paper", loss_aggregation="micro_batch_token_mean",
                per_device_train_batch_size=2, gradient_accumulation_steps=2, num_mini_batches=2)
    lengths = [3, 1, 4, 0, 5, 9, 2, 6]
    assert d._micro_normalizer(123.0, [0, 1], lengths) == 4 * 2 * 1
    assert d._micro_normalizer(123.0, [3], lengths) == 1.0 * 2      # an empty micro-batch never divides by 0
    d.cfg.loss_aggregation = "global_token_mean"
    assert d._micro_normalizer(123.0, [0, 1], lengths) == 123.0


def test_loss_aggregation_micro_batch_mean_of_token_means(dirs, tmp_path, monkeypatch):
    """With micro_batch_token_mean the summed micro-batch losses are the mean of each micro-batch's token mean."""
    import copsd.distill as dist

    d = _hybrid(dirs, tmp_path, objective="paper", loss_aggregation="micro_batch_token_mean", kl_coef=0.0,
                per_device_train_batch_size=2, gradient_accumulation_steps=4, num_mini_batches=1, learning_rate=0.0,
                max_steps=1)
    got = []
    real = dist.fused_paper_loss

    def spy(h, w, ids, old, adv, mask, normalizer, **kw):
        loss, stats, logp, ent = real(h, w, ids, old, adv, mask, normalizer, **kw)
        got.append((float(loss.detach()), float(stats["pg_loss_sum"]), int(mask.sum())))
        return loss, stats, logp, ent

    monkeypatch.setattr(dist, "fused_paper_loss", spy)
    d.train_step(0)
    assert len(got) == 4
    total = sum(loss for loss, _, _ in got)
    want = sum(pg / n for _, pg, n in got if n) / 4
    assert total == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_kl_clamp_reaches_the_loss(dirs, tmp_path, monkeypatch):
    import copsd.distill as dist

    seen = []
    real = dist.fused_paper_loss
    monkeypatch.setattr(dist, "fused_paper_loss", lambda *a, **kw: seen.append(kw["params"]) or real(*a, **kw))
    d = _hybrid(dirs, tmp_path, objective="paper", kl_clamp=2.5, max_steps=1)
    d.train_step(0)
    assert seen and all(p.kl_clamp == 2.5 for p in seen)


@pytest.mark.parametrize("flag", [False, True])
def test_weight_decay_on_1d_params(dirs, tmp_path, flag):
    from copsd.training import make_optimizer

    d = _hybrid(dirs, tmp_path, objective="paper", weight_decay_1d_params=flag, weight_decay=0.01)
    opt = make_optimizer(d.model, d.cfg)
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    one_d = [p for p in d.model.parameters() if p.dim() == 1]
    assert one_d and all(decay_of[id(p)] == (0.01 if flag else 0.0) for p in one_d)
    assert all(decay_of[id(p)] == 0.01 for p in d.model.parameters() if p.dim() >= 2)
