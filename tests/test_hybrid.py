"""The hybrid objective's pieces: row routing, the teacher as an outcome judge, outcome advantages."""

import json
import logging

import pytest
import torch

from copsd.data import PromptRow, load_prompt_rows
from copsd.hybrid import OutcomeJudge, OutcomeScores, broadcast, log_malformed, outcome_advantages, reward_type


def _row(kind, category=None, reward=None):
    return PromptRow(messages=[{"role": "user", "content": "q"}], kind=kind, category=category, reward=reward)


def test_reward_type_routing():
    assert reward_type(_row("general")) == "judge"
    assert reward_type(_row("harmful", "violence")) == "token"
    assert reward_type(_row("benign")) == "token"
    assert reward_type(_row("general", reward="token")) == "token"            # the row's own field wins
    assert reward_type(_row("harmful", reward="judge")) == "judge"
    assert reward_type(_row("harmful", "privacy"), judge_kinds=(), judge_categories=("privacy",)) == "judge"
    assert reward_type(_row("general"), judge_kinds=()) == "token"


def test_prompt_row_reward_field(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text(json.dumps({"prompt": "q", "kind": "general", "reward": "judge"}) + "\n"
                 + json.dumps({"prompt": "q", "kind": "harmful"}) + "\n")
    rows = load_prompt_rows(str(p))
    assert [r.reward for r in rows] == ["judge", None]
    assert rows[0].to_json()["reward"] == "judge" and "reward" not in rows[1].to_json()
    p.write_text(json.dumps({"prompt": "q", "kind": "general", "reward": "outcome"}) + "\n")
    with pytest.raises(ValueError, match="line 1: 'reward' must be one of"):
        load_prompt_rows(str(p))


def test_outcome_advantages_malformed_get_zero_and_are_left_out():
    rewards = [0.9, None, 0.1, 0.5, 0.7, None, 0.3, None]
    groups = [0, 0, 0, 0, 1, 1, 1, 2]
    adv = outcome_advantages(rewards, groups)
    g0 = torch.tensor([0.9, 0.1, 0.5])
    want0 = (g0 - g0.mean()) / (g0.std() + 1e-6)
    torch.testing.assert_close(adv[[0, 2, 3]], want0)
    g1 = torch.tensor([0.7, 0.3])
    torch.testing.assert_close(adv[[4, 6]], (g1 - g1.mean()) / (g1.std() + 1e-6))
    assert adv[1] == 0 and adv[5] == 0 and adv[7] == 0
    assert (outcome_advantages([None, None], [0, 0]) == 0).all()
    torch.testing.assert_close(broadcast(torch.tensor([1.0, -2.0, 3.0]), [2, 0, 3]),
                               torch.tensor([1.0, 1.0, 3.0, 3.0, 3.0]))


def test_log_malformed(caplog):
    with caplog.at_level(logging.WARNING, logger="copsd"):
        log_malformed(3, OutcomeScores([0.5, None, None], ["Score: 5", "garbage one", "x" * 500]))
        log_malformed(4, OutcomeScores([0.5], ["Score: 5"]))
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "step 3: 2 of 3 verdicts malformed" in msgs[0] and "garbage one" in msgs[0]
    assert "x" * 161 not in msgs[0]


class _Scripted(OutcomeJudge):
    def __init__(self, tok, model, replies):
        super().__init__(model, tok, max_new_tokens=4)
        self.judge.generate = lambda prompts: [replies[i % len(replies)] for i in range(len(prompts))]


def test_outcome_judge_scales_scores_and_puts_constitution_and_reference_in_the_prompt():
    from test_trainer import tiny_tokenizer

    tok = tiny_tokenizer()
    j = _Scripted(tok, torch.nn.Linear(1, 1), ["Score: 7", "no idea", "Score: 10", "Score: 0"])
    out = j(["Be safe."] * 4, ["q1", "q2", "q3", "q4"], ["r1", "r2", "r3", "r4"], [None, "gold", None, None])
    assert out.rewards == [0.7, None, 1.0, 0.0] and out.malformed == 1
    prompts = j.prompts(["Be safe.", "Be safe."], ["q1", "q2"], ["r1", "r2"], [None, "gold"])
    assert prompts[0].startswith("Be safe.") and "[Request]\nq1" in prompts[0] and "[Reply]\nr1" in prompts[0]
    assert "[Reference answer]" not in prompts[0] and "[Reference answer]\ngold" in prompts[1]
