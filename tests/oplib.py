"""The one set of helpers the per-op tests share (``test_linear_logprobs.py``, ``test_linear_topk.py``,
``test_linear_divergence.py``, ``test_logprobs_loss.py``, ``test_attention.py``, ``test_backend_*.py``).

Ground truth is ``copsd.reference`` (imported here as ``dense``: the dense float64 definitions of docs/ops.md,
shared with the benchmarks); the accuracy criterion for float32 and lower is ``tests/criteria.py``.  Backend
fixtures (``cpu_workspace``, ``triton_path``, ``triton_slices``) live in ``tests/conftest.py``; ``CPU`` and
``TRITON`` below are the marks that apply them to a test of that backend.
"""

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from criteria import C, assert_accurate

from copsd import reference as dense
from copsd.ops._spec import LogitSpec

if not torch.cuda.is_available():
    # The Triton kernels must be decorated in interpreter mode: set before they are imported, and re-import them
    # if an earlier test module imported them compiled (tests/conftest.py sets it before anything else).
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("copsd_kernels._common", "copsd_kernels.linear_logprobs",
                  "copsd_kernels.linear_divergence", "copsd_kernels.linear_topk",
                  "copsd_kernels.linear_rows", "copsd.backends._triton_common", "copsd.backends._triton_logprobs",
                  "copsd.backends._triton_topk", "copsd.backends._triton_divergence"):
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])

F64 = torch.float64
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton tests put their tensors

# A test of one backend's kernel-level functions: the C++ CPU backend with a tiny workspace (skipped where the
# extension is not built); the Triton backend on both GPU paths (interpreter on CPU tensors without a GPU).
CPU = pytest.mark.usefixtures("cpu_workspace")
TRITON = pytest.mark.usefixtures("triton_path")


def path_independent(fn):
    """A Triton test that does not depend on the GPU path: runs once instead of once per path."""
    fn.path_independent = True
    return fn


def public_backends():
    """The backends the public-op tests run on CPU tensors: the reference and, where built, the C++ one."""
    from copsd.ops import available_backends

    return [b for b in ("reference", "cpu") if b in available_backends()]


CPU_BACKENDS = public_backends()

# ----------------------------------------------------------------------------- logit options

LOGITS = {  # kernel-level LogitSpecs (CPU backend tests)
    "plain": LogitSpec(),
    "temp_scale_softcap": LogitSpec(temperature=0.7, logit_scale=1.3, softcap=3.0),
    "temp_scale": LogitSpec(temperature=1.8, logit_scale=0.6),
}
SPECS = {  # kernel-level LogitSpecs (Triton backend tests)
    "plain": LogitSpec(),
    "all": LogitSpec(temperature=1.7, logit_scale=0.8, softcap=4.0),
}
LOGIT_OPTS = [  # keyword options of the public ops
    dict(),
    dict(temperature=0.7, logit_scale=1.3),
    dict(temperature=2.0, softcap=5.0),
]
SUPPORTS = [("full", "bucket"), ("teacher_topk", "bucket"), ("teacher_topk", "renorm"), ("teacher_topk", "none")]
KIND_SUPPORT = [
    ("reverse_kl", "full", None), ("forward_kl", "full", None), ("jsd", "full", None),
    ("reverse_kl", "teacher_topk", "bucket"), ("forward_kl", "teacher_topk", "bucket"),
    ("jsd", "teacher_topk", "bucket"), ("reverse_kl", "teacher_topk", "renorm"),
    ("forward_kl", "teacher_topk", "renorm"), ("jsd", "teacher_topk", "renorm"),
    ("reverse_kl", "teacher_topk", "none"), ("forward_kl", "teacher_topk", "none"),
]
DIV_NAMES = ("loss", "d_hidden", "d_weight")


def spec_kwargs(spec):
    return dict(temperature=spec.temperature, logit_scale=spec.logit_scale, softcap=spec.softcap)


# ----------------------------------------------------------------------------- inputs


def op_inputs(N, H, V, scale=1.0, dtype=F64, Ht=None):
    """Public-op tests: a student (hidden and lm_head require grad) and a teacher (``Ht``: its hidden size)."""
    xs = (torch.randn(N, H, dtype=dtype) * scale).requires_grad_()
    ws = torch.randn(V, H, dtype=dtype).requires_grad_()
    Ht = Ht or H
    xt = torch.randn(N, Ht, dtype=dtype) * scale
    wt = torch.randn(V, Ht, dtype=dtype)
    return xs, ws, xt, wt


def cpu_inputs(N, H, V, dtype, scale=1.0, teacher_scale=None, seed=None, dominant=None, ids=False):
    """Kernel-level tests: ``[xs, ws, xt, wt]`` drawn in float64 (from ``seed``, else a seed of the shape), then cast;
    ``dominant``: that vocabulary row of ``ws`` scaled by 6; ``ids``: also ``[N]`` random target ids (int64)."""
    g = torch.Generator().manual_seed(N * 1000 + V if seed is None else seed)
    ts = scale if teacher_scale is None else teacher_scale
    xs = torch.randn(N, H, generator=g, dtype=torch.float64) * scale
    xt = torch.randn(N, H, generator=g, dtype=torch.float64) * ts
    ws = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 2
    wt = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 2
    if dominant is not None:
        ws[dominant] *= 6.0
    out = [t.to(dtype) for t in (xs, ws, xt, wt)]
    return out + [torch.randint(0, V, (N,), generator=g)] if ids else out


def run_json(code, drop=(), args=(), cwd=None, **env):
    """``python -c code *args`` in a fresh process (the knobs read once per process start clean there), in ``cwd``:
    this process's environment without the variables whose names start with one of ``drop``, plus ``env``; returns
    the JSON of the last line the code prints."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(tuple(drop))}
    out = subprocess.run([sys.executable, "-c", code, *args], env=dict(base, **env), cwd=cwd, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def rand_lm(N, H, V, scale=1.0, dtype=torch.float32, device=DEV):
    """Triton tests: one side's hidden states and lm_head on ``DEV``."""
    x = torch.randn(N, H, dtype=torch.float64)
    w = torch.randn(V, H, dtype=torch.float64) * (scale / H**0.5)
    return x.to(device, dtype), w.to(device, dtype)


def random_ids(N, V, k, seed=0):
    """``[N, k]`` distinct random ids per row (a teacher-top-k support)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, V, generator=g).argsort(dim=1)[:, :k].contiguous()


def exact_order(z):
    """Ids of one row of logits (a list of floats) in the C++ top-k selection's documented order (the top-k op's and
    the teacher-top-k divergence's): value descending, equal values by ascending id, NaN last (by id)."""
    return sorted(range(len(z)), key=lambda j: (z[j] != z[j], -z[j] if z[j] == z[j] else 0.0, j))


def teacher_ids(xt, wt, k, opts):
    """The teacher's true top-k ids under the public-op logit options ``opts``."""
    return dense.logits(xt, wt, **opts).topk(k, dim=1).indices


def z64_of(x, w, spec):
    """float64 logits on the CPU of (possibly low-precision, GPU) inputs under a LogitSpec."""
    return dense.logits(x.double().cpu(), w.double().cpu(), **spec_kwargs(spec))


# ----------------------------------------------------------------------------- checks

F64_TOL = dict(rtol=1e-9, atol=1e-11)  # float64: the semantics, far above any BLAS rounding


def check_close(got, want, rtol=1e-9, atol=1e-9):
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def close64(got, want, what):
    torch.testing.assert_close(got.double(), want.double(), **F64_TOL, msg=lambda m: f"{what}: {m}")


def close(actual, expected, tol):
    """Max abs error relative to the scale of the expected tensor."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert torch.isfinite(actual).all()
    err = (actual - expected).abs().max().item()
    assert err <= tol * (1.0 + expected.abs().max().item()), f"max err {err}"


def check_accurate(got, exact, plain, names, dtype):
    """float64: fixed tight tolerance; lower precision: the error-relative criterion against ``plain``."""
    for g, e, p, name in zip(got, exact, plain, names):
        if dtype == torch.float64:
            close64(g, e, name)
        else:
            assert_accurate(g, e, p, name)


def check_div(got, xs, ws, xt, wt, logit, div, K, tg, what=""):
    """The op's (loss, d_hidden, d_weight) against float64 (and plain PyTorch in the inputs' precision)."""
    dtype = xs.dtype
    exact = dense.divergence_grads(xs, ws, xt, wt, logit, div, K, tg)
    plain = exact if dtype == torch.float64 else dense.divergence_grads(xs, ws, xt, wt, logit, div, K, tg,
                                                                        torch.float32)
    check_accurate(got, exact, plain, [f"{what}{n}" for n in DIV_NAMES], dtype)
    return exact, plain


def fa_check(got, want64, plain_lowp, name):
    """The criterion against plain PyTorch in the inputs' low precision (the op accumulates in fp32, so it
    is usually far better; the floor is in fp32 ulps)."""
    assert_accurate(got, want64, plain_lowp, name, dtype=torch.float32)


def bf16_criterion(kernel, exact, torch_low):
    """FlashAttention criterion: kernel error <= 2x the error of plain PyTorch in the same precision."""
    k_err = (kernel.double().cpu() - exact).abs().max().item()
    t_err = (torch_low.double().cpu() - exact).abs().max().item()
    assert k_err <= 2 * t_err + 1e-6, f"kernel err {k_err} vs torch-bf16 err {t_err}"


def check_topk(ids, lp, lse, z64, k, z_plain=None, tol=None):
    """A top-k answer ``(ids, lp, lse)`` against the float64 logits ``z64`` of the op's inputs, as sets with
    tie tolerance: the values are the k largest log-probs (descending), the ids are distinct and each id's
    true log-prob equals its returned value.

    Three precisions of the same checks: ``z_plain`` given (the same logits in plain fp32 PyTorch): the
    error-relative criterion; ``tol`` given: errors up to ``tol`` relative to the values' scale (Triton
    tests, low-precision GPU inputs); neither (a float64 op): 1e-12."""
    ls = z64.log_softmax(-1)
    if tol is not None:
        L = z64.logsumexp(-1)
        close(lse, L, tol)
        ls = z64 - L[:, None]
        ids, lp = ids.cpu(), lp.double().cpu()
        assert ids.shape == (z64.shape[0], k) and ids.dtype == torch.int64
        assert (lp[:, 1:] <= lp[:, :-1] + tol / 10).all()
        assert all(len(set(r.tolist())) == k for r in ids)
        close(lp, ls.gather(1, ids), tol)
        # a true top-k: every returned value >= the k-th best (ties allowed within tolerance)
        kth = ls.topk(k, dim=1).values[:, -1:]
        assert (ls.gather(1, ids) >= kth - tol).all()
        return
    want_vals = ls.topk(k, dim=1).values
    assert ids.shape == lp.shape == (z64.shape[0], k) and ids.dtype == torch.int64
    assert (lp[:, 1:] <= lp[:, :-1]).all()
    assert (ids.sort(1).values.diff(dim=1) > 0).all()
    if z_plain is None:
        torch.testing.assert_close(lp.double(), want_vals, rtol=0, atol=1e-12)
        torch.testing.assert_close(ls.gather(1, ids), want_vals, rtol=0, atol=1e-12)
        torch.testing.assert_close(lse.double(), z64.logsumexp(-1), rtol=0, atol=1e-12)
        return
    plain_vals = z_plain.log_softmax(-1).topk(k, dim=1).values
    assert_accurate(lp, want_vals, plain_vals, "top-k log-probs")
    # Near-ties closer than the values' rounding may be resolved either way: a swapped pair costs at most
    # twice the values' error, hence 2 C.
    assert_accurate(ls.gather(1, ids), want_vals, plain_vals, "true log-probs of the returned ids", c=2 * C)
    assert_accurate(lse, z64.logsumexp(-1), z_plain.logsumexp(-1), "lse")
