"""Plain data passed from the public ops to the backends (already validated)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class LogitSpec:
    """How logits are formed from ``hidden @ weight.T``.

    ``z = logit_scale * (hidden @ weight.T)``; if ``softcap``: ``z = softcap * tanh(z / softcap)``;
    then ``z = z / temperature``.
    """

    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: Optional[float] = None


@dataclass(frozen=True)
class DivergenceSpec:
    """Which divergence, on which support.

    kind: "reverse_kl" | "forward_kl" | "jsd"; beta used by "jsd" only (0 < beta < 1).
    support: "full" | "teacher_topk"; tail: "bucket" | "renorm" | "none" (teacher_topk only).
    term_clip: clip each vocabulary summand to at most this value before summing (None: off).
    """

    kind: str = "reverse_kl"
    beta: float = 0.5
    support: str = "full"
    tail: str = "bucket"
    term_clip: Optional[float] = None


KINDS = ("reverse_kl", "forward_kl", "jsd")
SUPPORTS = ("full", "teacher_topk")
TAILS = ("bucket", "renorm", "none")
REDUCTIONS = ("none", "sum", "mean")
