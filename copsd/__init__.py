"""copsd: Constitutional On-Policy Safe Distillation.

Kernel-first: the loss ops in :mod:`copsd.ops` take hidden states and lm_head weights and never
materialise a ``[tokens, vocab]`` tensor; a thin trainer calls them.
"""

__version__ = "0.1.0"

from copsd import ops  # noqa: E402,F401
