"""C++ CPU backend (extension ``copsd._C``, sources in ``csrc/cpu``).

Tokens are processed in row chunks: one ATen/MKL GEMM per chunk and side writes
full-vocabulary rows into a reusable ``[rows, V]`` workspace, the fused C++ epilogue reduces
each row (online max/sum-exp, entropy, divergence accumulators, running top-k) in parallel
over rows, and when gradients are wanted it leaves ``dLoss/dlogits`` in the same buffer so two
more GEMMs give ``d_hidden`` and accumulate ``d_weight`` in fp32.  A loss plus its gradient
therefore costs the four GEMMs of the naive computation, and memory stays at
``WORKSPACE_BYTES`` (at least one vocabulary row per side) instead of ``[N, V]``.

Kernel-level interface: see the docstring of :mod:`copsd.backends`.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from copsd.ops._spec import DivergenceSpec, LogitSpec

NAME = "cpu"


def _workspace_bytes():
    raw = os.environ.get("COPSD_CPU_WORKSPACE_MB", "64")
    try:
        mb = int(raw)
    except ValueError:
        mb = 0
    if mb < 1:
        raise ValueError(f"COPSD_CPU_WORKSPACE_MB must be a positive integer (MiB), got {raw!r}")
    return mb << 20


# Bytes of logits workspace per call (the [rows, V] buffers of both sides); also bounds the
# per-block fp32 copy of a low-precision lm_head.  The default 64 MiB keeps 256 rows of a 32k
# vocabulary per side: large enough for efficient GEMMs, far below [N, V].  At least one
# vocabulary row per side is always used, whatever the budget.
WORKSPACE_BYTES = _workspace_bytes()

_KIND = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2}
_SUPPORT = {"full": 0, "teacher_topk": 1}
_TAIL = {"bucket": 0, "renorm": 1, "none": 2}

try:
    from copsd import _C

    _C_ERROR = None
except ImportError as e:  # not built (COPSD_SKIP_NATIVE=1 or no compiler), or built but broken
    _C, _C_ERROR = None, e


def missing():
    if _C is not None:
        return None
    if importlib.util.find_spec("copsd._C") is None:
        return "the C++ extension copsd._C is not built (COPSD_SKIP_NATIVE=1 or no compiler at install time)"
    raise ImportError(f"the C++ extension copsd._C is built but does not load: {_C_ERROR}") from _C_ERROR


def available():
    return _C is not None


def supports(op, device):
    return torch.device(device).type == "cpu"


def isa():
    """Instruction set the C++ row epilogues use here ("avx512", "avx2" or "base")."""
    return _C.isa()


def _logit_args(logit: LogitSpec):
    return float(logit.temperature), float(logit.logit_scale), (
        None if logit.softcap is None else float(logit.softcap))


def logprobs_forward(hidden, weight, ids, logit: LogitSpec):
    return _C.logprobs_forward(hidden, weight, ids.long(), *_logit_args(logit), WORKSPACE_BYTES)


def logprobs_backward(hidden, weight, ids, lse, entropy, g_logprobs, g_entropy, g_lse, logit: LogitSpec):
    return _C.logprobs_backward(hidden, weight, ids.long(), lse, entropy, g_logprobs, g_entropy, g_lse,
                                *_logit_args(logit), WORKSPACE_BYTES)


def logprobs_loss(hidden, weight, ids, logit: LogitSpec, coeff):
    """A per-token loss of the log-probs / entropies with its gradient taken in the forward pass: the C++
    driver keeps each token chunk's logits between the row statistics and the row gradients (3 GEMMs).
    ``coeff(r0, rows, lp, ent)`` returns the chunk's (d loss / d lp, d loss / d ent).  Returns
    ``(lp, ent, d_hidden, d_weight)``."""
    return _C.logprobs_loss(hidden, weight, ids.long(), coeff, *_logit_args(logit), WORKSPACE_BYTES)


def topk(hidden, weight, k, logit: LogitSpec):
    return _C.topk(hidden, weight, int(k), *_logit_args(logit), WORKSPACE_BYTES)


def divergence(s_hidden, s_weight, t_hidden, t_weight, logit: LogitSpec, div: DivergenceSpec,
               topk_ids=None, token_grad=None):
    return _divergence(s_hidden, s_weight, t_hidden, t_weight, logit, div, topk_ids, token_grad, None)[:3]


def divergence_stats(s_hidden, s_weight, t_hidden, t_weight, logit: LogitSpec, div: DivergenceSpec,
                     topk_ids, token_grad, stats_ids):
    """``divergence`` plus, from the rows the epilogue already holds (no extra GEMM), the student's log-prob of
    ``stats_ids`` and entropy and the teacher's log-prob of ``stats_ids``: ``(loss, dx | None, dw | None,
    stats[3, N])``."""
    return _divergence(s_hidden, s_weight, t_hidden, t_weight, logit, div, topk_ids, token_grad,
                       stats_ids.long().contiguous())


def _divergence(s_hidden, s_weight, t_hidden, t_weight, logit, div, topk_ids, token_grad, stats_ids):
    if div.support == "teacher_topk" and topk_ids is None:
        raise ValueError("topk_ids must be an [N, k] int64 tensor when div.support == 'teacher_topk'")
    ids = topk_ids.long().contiguous() if (topk_ids is not None and div.support == "teacher_topk") else None
    clip = None if div.term_clip is None else float(div.term_clip)
    return _C.divergence(s_hidden, s_weight, t_hidden, t_weight, *_logit_args(logit), _KIND[div.kind],
                         float(div.beta), _SUPPORT[div.support], _TAIL[div.tail], clip, ids, token_grad, stats_ids,
                         WORKSPACE_BYTES)
