"""The ``hybrid`` Stage-2 objective: a per-row choice between the token reward and a judge's outcome reward.

Rows routed to ``token`` are trained exactly as under ``paper`` (per-token reward from the teacher/student
log-ratio, group token z-score).  Rows routed to ``judge`` get one reward per sampled answer: the
constitution-conditioned teacher reads the request, the row's constitution text (and the row's
``reference`` answer when it has one) and the whole answer, and grades it ``Score: N`` on 0..10
(:data:`copsd.judge.OUTCOME_TEMPLATE`, rendered through the chat template, decoded greedily); the reward is
N / 10.  The G answers of a prompt are z-scored against each other (outcome-level GRPO,
:func:`copsd.objectives.group_outcome_zscore`) and the answer's advantage is broadcast to all its tokens.
Both kinds of row then share the PPO dual-clip loss and the k3 KL term.

Routing (:func:`reward_type`): a row's own ``reward`` field (``"token"`` / ``"judge"``) wins; otherwise a
row goes to the judge when its ``kind`` is in ``judge_kinds`` or its ``category`` in ``judge_categories``
(by default the ``general`` rows, the capability prompts, as the reference implementation judges its
general-ability data), else to the token reward.

The judge reads text only: for a row with images the request is its text followed by a note that images came
with it (:func:`copsd.judge.judge_query`), and :func:`warn_image_rows` logs, once before training, how many
judge-routed rows have images.  To have images judged, route those rows to the token reward
(``"reward": "token"``): the teacher's per-token scores do see them.

Malformed verdicts (no parseable score, see :func:`copsd.judge.parse_score`) are counted and logged; such
an answer gets advantage 0 (it neither pushes nor pulls the policy) and is left out of its group's mean
and std, so a confused judge can slow learning on its rows but never crash or stall a step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from copsd.judge import Judge, outcome_prompt
from copsd.objectives import group_outcome_zscore

logger = logging.getLogger("copsd")

SCORE_LOW, SCORE_HIGH = 0, 10


def reward_type(row, judge_kinds: Sequence[str] = ("general",), judge_categories: Sequence[str] = ()) -> str:
    """``"judge"`` or ``"token"`` for a prompt row (see the module doc)."""
    if getattr(row, "reward", None):
        return row.reward
    if row.kind in judge_kinds or (row.category is not None and row.category in judge_categories):
        return "judge"
    return "token"


def warn_image_rows(rows, reward_types: Sequence[str]) -> int:
    """Log a warning when judge-routed rows have images (the judge does not see them); returns their count."""
    n = sum(1 for r, t in zip(rows, reward_types) if t == "judge" and getattr(r, "images", None))
    if n:
        judged = sum(t == "judge" for t in reward_types)
        logger.warning("hybrid: %d of the %d rows routed to the judge have images; the judge reads the request's "
                       "text only (told that images came with it), so its reward ignores them. Give such rows "
                       "\"reward\": \"token\" to have the images count", n, judged)
    return n


@dataclass
class OutcomeScores:
    rewards: list[float | None]   # score / 10 per answer, None where the verdict was malformed
    texts: list[str]              # the judge's replies

    @property
    def malformed(self) -> int:
        return sum(r is None for r in self.rewards)


class OutcomeJudge:
    """The teacher as a judge of whole answers; ``__call__`` returns :class:`OutcomeScores`."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 128, batch_size: int = 8):
        self.judge = Judge(model, tokenizer, max_new_tokens=max_new_tokens, batch_size=batch_size)

    def prompts(self, constitution_texts, queries, responses, references) -> list[str]:
        return [outcome_prompt(c, q, r, ref) for c, q, r, ref in zip(constitution_texts, queries, responses,
                                                                     references)]

    def __call__(self, constitution_texts: Sequence[str], queries: Sequence[str], responses: Sequence[str],
                 references: Sequence[str | None]) -> OutcomeScores:
        out = self.judge.scores(self.prompts(constitution_texts, queries, responses, references),
                                low=SCORE_LOW, high=SCORE_HIGH)
        rewards = [None if v is None else float(v) / SCORE_HIGH for v in out.values]
        return OutcomeScores(rewards, out.texts)


def outcome_advantages(rewards: Sequence[float | None], groups: Sequence[int], *, device=None) -> torch.Tensor:
    """Per-answer outcome advantage ``[N]``: group z-score over the answers with a valid reward, 0 elsewhere."""
    adv = torch.zeros(len(rewards), dtype=torch.float32, device=device)
    valid = [i for i, r in enumerate(rewards) if r is not None]
    if valid:
        s = torch.tensor([float(rewards[i]) for i in valid], dtype=torch.float32, device=device)
        g = torch.tensor([int(groups[i]) for i in valid], dtype=torch.long, device=device)
        adv[torch.tensor(valid, dtype=torch.long, device=device)] = group_outcome_zscore(s, g).float()
    return adv


def broadcast(per_answer: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """``[sum(lengths)]``: each answer's value repeated over its tokens."""
    return torch.repeat_interleave(per_answer, torch.tensor(list(lengths), dtype=torch.long,
                                                            device=per_answer.device))


def log_malformed(step: int, scores: OutcomeScores, *, limit: int = 2) -> None:
    """One warning per step with malformed verdicts: the count and the first replies (shortened)."""
    bad = [t for r, t in zip(scores.rewards, scores.texts) if r is None]
    if not bad:
        return
    shown = "; ".join(repr(t[:160]) for t in bad[:limit])
    logger.warning("hybrid judge at step %d: %d of %d verdicts malformed (advantage 0), e.g. %s", step, len(bad),
                   len(scores.rewards), shown)
