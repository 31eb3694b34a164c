"""One accuracy criterion for results computed in float32 (or lower): error-relative, not a fixed tolerance.

A fixed ``atol``/``rtol`` on a float32 result silently encodes the machine it was tuned on: the GEMM's
blocking (MKL, OpenBLAS, the thread count) and the SIMD width of the row epilogues change the rounding, so a
bound that holds on an AVX-512 Xeon can fail on an AVX2 EPYC although both are correct.  Instead, as
FlashAttention does for low precision, every such check computes three things from the *same* inputs:

- ``exact``: the quantity in float64 (the dense definitions of ``copsd.reference``, autograd for gradients);
- ``plain``: the same quantity computed the naive way a user would, dense PyTorch in the op's precision
  (float32 logits, ``log_softmax``, autograd) -- its error is what this machine's float32 costs;
- ``got``: the op under test;

and requires ``err(got) <= C * err(plain) + floor``, errors being the largest absolute difference to ``exact``.

Why ``C = 4``: both the op and the plain computation pay the same dominant rounding (the float32 lm_head GEMM,
then sums over the vocabulary), so correct implementations have errors of the same size; the op adds a few
roundings of its own (a polynomial ``exp`` of 1-3 ulp, the online max/sum-exp rescaling, the one-pass KL form,
its own chunked summation order), and the max over a tensor of a random-walk error fluctuates by a factor ~2
between two summation orders.  Measured on the 2-core Xeon (AVX-512, MKL), 2026-11-30, over ~2900 checks of the
CPU-backend, logprobs_loss, teacher and rollout tests at every dispatch level (``COPSD_CPU_ISA=base|avx2|
avx512``) with 1 and 2 threads: the largest ``c`` any check needed was 1.7 (2.4 with a 4-ulp floor), for
d_hidden of the full-vocabulary reverse KL at the base/avx2 levels.  4 leaves room for another BLAS without
making the tests blind: a dropped tail bucket, a swapped KL direction, a wrong gradient sign, a 1e-4 relative
bias of the loss, a 1e-3 scale error of d_weight or a 1e-3 shift of the top-k LSE all fail them (checked by
mutating the CPU backend).

``floor`` (default: ``FLOOR_ULPS`` units in the last place of ``max(1, max |exact|)``) covers the case where
the plain computation happens to round almost like float64 while a correct op is a couple of roundings away.
The ops' intermediates (logits, log-probabilities, log-sum-exps) are of order 1 or larger even where the
result is small (a divergence of 1e-3 is a difference of log-probabilities of size ~5), so a correct float32
computation carries a few ulps *of 1* of absolute error; relative to that the floor is tiny, and any real
defect (errors of the size of the quantity) stays far above it.
"""

from __future__ import annotations

import os

import torch

C = 4.0
FLOOR_ULPS = 8


def max_error(got, exact) -> float:
    """Largest absolute difference; matching infinities count as equal, NaN (or a missed inf) as infinite."""
    got, exact = got.detach().double().cpu(), exact.detach().double().cpu()
    if got.numel() == 0:
        return 0.0
    same_inf = torch.isinf(exact) & (got == exact)
    diff = torch.where(same_inf, torch.zeros_like(exact), (got - exact).abs())
    return diff.nan_to_num(float("inf")).max().item()


def precision_floor(exact, dtype, ulps=FLOOR_ULPS, scale=1.0) -> float:
    finite = exact.detach().double()
    finite = finite[torch.isfinite(finite)]
    amax = finite.abs().max().item() if finite.numel() else 0.0
    return ulps * torch.finfo(dtype).eps * max(scale, amax)


def assert_accurate(got, exact, plain, what, *, c=C, floor=None, dtype=None, scale=1.0):
    """``err(got vs exact) <= c * err(plain vs exact) + floor`` (see the module docstring).

    ``plain`` is the naive dense PyTorch computation of the same quantity in the op's precision; ``dtype`` (that
    precision, default ``plain.dtype``) sets the floor's unit; ``scale`` (default 1) is the size of the
    quantity's intermediates where they exceed 1 (a gradient that cancels to ~0 from summands of size ``scale``).
    """
    assert got.shape == exact.shape == plain.shape, (what, tuple(got.shape), tuple(exact.shape), tuple(plain.shape))
    if floor is None:
        floor = precision_floor(exact, dtype or plain.dtype, scale=scale)
    err, base = max_error(got, exact), max_error(plain, exact)
    log = os.environ.get("COPSD_TEST_ERROR_LOG")  # measuring the ratios that justify C (one line per check)
    if log:
        with open(log, "a") as f:
            f.write(f"{err / max(base, 1e-300):.4g}\t{err:.3e}\t{base:.3e}\t{floor:.1e}\t"
                    f"{os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}\t{what}\n")
    assert err <= c * base + floor, (
        f"{what}: error {err:.3e} vs float64 > {c:g} x plain-PyTorch error {base:.3e} + floor {floor:.1e}")
    return err, base
