"""C++ CPU backend (copsd._C) against dense float64 formulas and the reference backend.

Ground truth: the dense ``[N, V]`` float64 formulas in ``tests/dense.py`` (the definitions of
docs/ops.md) with gradients from autograd, plus a few closed forms written in this file.  The
workspace is shrunk so every test crosses row-chunk (and up-cast block) boundaries.  float64 runs
check the semantics to ~1e-9; float32 and bf16/fp16 runs use the error-relative criterion of
``tests/criteria.py`` (error vs float64 at most a few times that of plain dense PyTorch in the
same precision), which holds on any CPU and BLAS, not a tolerance tuned on one machine.

The tests marked ``isa`` also run once per lower CPU dispatch level (``COPSD_CPU_ISA=base|avx2``)
in a subprocess: see ``test_cpu_dispatch_level`` at the end.
"""

import os
import re
import subprocess
import sys

import dense
import pytest
import torch
from criteria import C, assert_accurate

from copsd.backends import cpu, reference
from copsd.ops._spec import DivergenceSpec, LogitSpec

pytestmark = pytest.mark.skipif(not cpu.available(), reason="copsd._C (C++ CPU extension) is not built")

LOGITS = {
    "plain": LogitSpec(),
    "temp_scale_softcap": LogitSpec(temperature=0.7, logit_scale=1.3, softcap=3.0),
    "temp_scale": LogitSpec(temperature=1.8, logit_scale=0.6),
}
SUPPORTS = [("full", "bucket"), ("teacher_topk", "bucket"), ("teacher_topk", "renorm"), ("teacher_topk", "none")]
F64_TOL = dict(rtol=1e-9, atol=1e-11)  # float64: the semantics, far above any BLAS rounding


@pytest.fixture(autouse=True)
def small_workspace(monkeypatch):
    """~5 rows per chunk at the test vocabularies, so the row-chunk loop runs many times."""
    monkeypatch.setattr(cpu, "WORKSPACE_BYTES", 5 * 2 * 211 * 8)


def _inputs(N, H, V, dtype, scale=1.0, teacher_scale=None):
    g = torch.Generator().manual_seed(N * 1000 + V)
    ts = scale if teacher_scale is None else teacher_scale
    xs = torch.randn(N, H, generator=g, dtype=torch.float64) * scale
    xt = torch.randn(N, H, generator=g, dtype=torch.float64) * ts
    ws = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 2
    wt = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 2
    return [t.to(dtype) for t in (xs, ws, xt, wt)]


def _random_ids(N, V, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, V, generator=g).argsort(dim=1)[:, :k].contiguous()


_dense_div = dense.divergence_grads  # loss and gradients in float64 (or plain fp32), shared with the Triton tests


def _dense_logprobs(x, w, ids, logit, gs, dtype=torch.float64):
    """(logprobs, entropy, lse) and the gradients of sum(g_i * out_i) (None gradients skipped)."""
    a = x.detach().to(dtype).clone().requires_grad_()
    b = w.detach().to(dtype).clone().requires_grad_()
    out = dense.logprobs(a, b, ids, logit.temperature, logit.logit_scale, logit.softcap)
    if any(g is not None for g in gs):
        sum((o * g.to(dtype)).sum() for o, g in zip(out, gs) if g is not None).backward()
    return tuple(o.detach() for o in out), a.grad, b.grad


def _close64(got, want, what):
    torch.testing.assert_close(got.double(), want.double(), **F64_TOL, msg=lambda m: f"{what}: {m}")


def _check(got, exact, plain, names, dtype):
    """float64: fixed tight tolerance; lower precision: the error-relative criterion against ``plain``."""
    for g, e, p, name in zip(got, exact, plain, names):
        if dtype == torch.float64:
            _close64(g, e, name)
        else:
            assert_accurate(g, e, p, name)


DIV_NAMES = ("loss", "d_hidden", "d_weight")


def _check_div(got, xs, ws, xt, wt, logit, div, K, tg, what=""):
    """The op's (loss, d_hidden, d_weight) against float64 (and plain PyTorch in the inputs' precision)."""
    dtype = xs.dtype
    exact = _dense_div(xs, ws, xt, wt, logit, div, K, tg)
    plain = exact if dtype == torch.float64 else _dense_div(xs, ws, xt, wt, logit, div, K, tg, torch.float32)
    _check(got, exact, plain, [f"{what}{n}" for n in DIV_NAMES], dtype)
    return exact, plain


# ----------------------------------------------------------------------------- divergence


@pytest.mark.isa
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("logit_name", ["plain", "temp_scale_softcap"])
@pytest.mark.parametrize("support,tail", SUPPORTS)
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
@pytest.mark.parametrize("clip", [None, 0.004])
def test_divergence_matches_dense(kind, support, tail, logit_name, dtype, clip):
    N, H, V = 23, 12, 211
    logit = LOGITS[logit_name]
    xs, ws, xt, wt = _inputs(N, H, V, dtype)
    div = DivergenceSpec(kind=kind, beta=0.3, support=support, tail=tail, term_clip=clip)
    K = _random_ids(N, V, 9) if support == "teacher_topk" else None
    tg = torch.randn(N, dtype=torch.float64).to(dtype)
    loss, dx, dw = cpu.divergence(xs, ws, xt, wt, logit, div, K, tg)
    assert loss.dtype == dx.dtype == dw.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert dx.shape == xs.shape and dw.shape == ws.shape
    exact, plain = _check_div((loss, dx, dw), xs, ws, xt, wt, logit, div, K, tg)
    want_loss = exact[0]
    if clip is not None:  # the clip must actually bind somewhere, or the test proves nothing
        unclipped = _dense_div(xs, ws, xt, wt, logit, DivergenceSpec(kind, 0.3, support, tail), K, tg)[0]
        assert (unclipped - want_loss).abs().max() > 1e-6
    # Loss without gradient: the same numbers.
    loss2, none_dx, none_dw = cpu.divergence(xs, ws, xt, wt, logit, div, K, None)
    assert none_dx is None and none_dw is None
    _check([loss2], [exact[0]], [plain[0]], ["loss (no grad)"], dtype)


@pytest.mark.parametrize("support,tail", SUPPORTS)
@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
def test_divergence_matches_reference_backend(kind, support, tail, small_chunks):
    N, H, V = 19, 10, 150
    logit = LOGITS["temp_scale"]
    xs, ws, xt, wt = _inputs(N, H, V, torch.float64)
    div = DivergenceSpec(kind=kind, beta=0.6, support=support, tail=tail, term_clip=0.05)
    K = reference.topk(xt, wt, 11, logit)[0] if support == "teacher_topk" else None
    tg = torch.rand(N, dtype=torch.float64) - 0.3
    got = cpu.divergence(xs, ws, xt, wt, logit, div, K, tg)
    want = reference.divergence(xs, ws, xt, wt, logit, div, K, tg)
    for g, w, name in zip(got, want, DIV_NAMES):
        _close64(g, w, name)


@pytest.mark.parametrize("t_dtype", [torch.float32, torch.bfloat16])
def test_teacher_with_other_hidden_size_and_dtype(t_dtype):
    """The teacher may be a different model: its own hidden size and dtype."""
    N, V = 15, 211
    xs, ws, _, _ = _inputs(N, 12, V, torch.float32)
    _, _, xt, wt = _inputs(N, 20, V, torch.float32)
    xt, wt = xt.to(t_dtype), wt.to(t_dtype)
    K = _random_ids(N, V, 5)
    tg = torch.rand(N)
    for support in ("full", "teacher_topk"):
        div = DivergenceSpec(kind="forward_kl", support=support)
        got = cpu.divergence(xs, ws, xt, wt, LOGITS["temp_scale"], div, K, tg)
        _check_div(got, xs, ws, xt, wt, LOGITS["temp_scale"], div, K, tg, f"{support} ")


def test_clip_binds_and_changes_result():
    """term_clip must change both loss and gradient when some summand exceeds it."""
    N, H, V = 9, 8, 64
    xs, ws, xt, wt = _inputs(N, H, V, torch.float64, scale=2.0)
    tg = torch.ones(N, dtype=torch.float64)
    plain = cpu.divergence(xs, ws, xt, wt, LogitSpec(), DivergenceSpec(), None, tg)
    clipped = cpu.divergence(xs, ws, xt, wt, LogitSpec(), DivergenceSpec(term_clip=0.01), None, tg)
    assert (clipped[0] < plain[0] - 1e-6).any()
    assert not torch.allclose(clipped[1], plain[1])


def test_reverse_kl_closed_form():
    """KL(q||p) = sum q (log q - log p) written out with softmax, independent of dense.py."""
    N, H, V = 7, 6, 33
    xs, ws, xt, wt = _inputs(N, H, V, torch.float64)
    q = torch.softmax(xs @ ws.T, -1)
    p = torch.softmax(xt @ wt.T, -1)
    want = (q * (q.log() - p.log())).sum(-1)
    got = cpu.divergence(xs, ws, xt, wt, LogitSpec(), DivergenceSpec(), None, None)[0]
    _close64(got, want, "KL(q||p)")
    fwd = cpu.divergence(xs, ws, xt, wt, LogitSpec(), DivergenceSpec(kind="forward_kl"), None, None)[0]
    _close64(fwd, (p * (p.log() - q.log())).sum(-1), "KL(p||q)")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_single_token_and_identical_distributions(kind, dtype):
    """N = 1; student == teacher gives loss 0 and gradient 0 on every support."""
    N, H, V = 1, 5, 211
    xs, ws, _, _ = _inputs(N, H, V, dtype, scale=3.0)
    tg = torch.full((N,), 0.7, dtype=dtype)
    for support, tail in SUPPORTS:
        div = DivergenceSpec(kind=kind, support=support, tail=tail)
        K = _random_ids(N, V, 4) if support == "teacher_topk" else None
        loss, dx, dw = cpu.divergence(xs, ws, xs, ws, LOGITS["temp_scale_softcap"], div, K, tg)
        # Both sides compute the same logits, so the summands cancel up to the epilogue's own rounding
        # (no BLAS error enters): a few ulp of the O(1) terms.
        atol = 1e-12 if dtype == torch.float64 else 16 * torch.finfo(torch.float32).eps
        assert loss.abs().max() <= atol, (support, tail, loss)
        if tail == "none":  # the raw partial sum is not a divergence: its gradient need not vanish
            continue
        assert dx.abs().max() <= atol and dw.abs().max() <= atol, (support, tail)
    # And a different teacher with N = 1 still matches the dense formula.
    xs, ws, xt, wt = _inputs(N, H, V, dtype)
    div = DivergenceSpec(kind=kind)
    tg = torch.tensor([1.3], dtype=dtype)
    got = cpu.divergence(xs, ws, xt, wt, LogitSpec(), div, None, tg)
    _check_div(got, xs, ws, xt, wt, LogitSpec(), div, None, tg)


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_vocab_of_one_and_k_equal_v(kind):
    """V = 1: every distribution is a point mass (loss 0, gradient 0).  k = V: empty tail."""
    xs, ws, xt, wt = _inputs(6, 4, 1, torch.float32)
    tg = torch.ones(6)
    for support, tail in SUPPORTS:
        K = torch.zeros(6, 1, dtype=torch.int64) if support == "teacher_topk" else None
        loss, dx, dw = cpu.divergence(xs, ws, xt, wt, LogitSpec(), DivergenceSpec(kind=kind, support=support,
                                                                                    tail=tail), K, tg)
        assert torch.equal(loss, torch.zeros(6)) and torch.equal(dx, torch.zeros_like(dx))
        assert torch.equal(dw, torch.zeros_like(dw))
    xs, ws, xt, wt = _inputs(5, 4, 12, torch.float64)
    K = _random_ids(5, 12, 12)
    tg = torch.rand(5, dtype=torch.float64)
    for tail in ("bucket", "renorm", "none"):
        div = DivergenceSpec(kind=kind, support="teacher_topk", tail=tail)
        got = cpu.divergence(xs, ws, xt, wt, LogitSpec(), div, K, tg)
        full = cpu.divergence(xs, ws, xt, wt, LogitSpec(), DivergenceSpec(kind=kind), None, tg)
        for g, w, name in zip(got, full, DIV_NAMES):  # k = V is the full divergence
            _close64(g, w, f"{tail} {name}")


@pytest.mark.isa
@pytest.mark.parametrize("support,tail", SUPPORTS)
def test_extreme_logits(support, tail):
    """Logits of +-1e4 scale: finite, as accurate as plain fp32 PyTorch, no NaN from exp underflow."""
    N, H, V = 11, 8, 211
    xs, ws, xt, wt = _inputs(N, H, V, torch.float64, scale=2.0e3, teacher_scale=1.5e3)
    assert (xs @ ws.T).abs().max() > 5e3
    K = _random_ids(N, V, 6, seed=3) if support == "teacher_topk" else None
    tg = torch.rand(N, dtype=torch.float64)
    for kind in ("reverse_kl", "forward_kl", "jsd"):
        div = DivergenceSpec(kind=kind, support=support, tail=tail)
        for dtype in (torch.float64, torch.float32):
            args = [t.to(dtype) for t in (xs, ws, xt, wt)]
            got = cpu.divergence(*args, LogitSpec(), div, K, tg.to(dtype))
            for g, name in zip(got, DIV_NAMES):
                assert torch.isfinite(g).all(), (kind, dtype, name)
            # float64 truth of the rounded inputs (fp32 logits of 1e4 carry ~1e-3 error, plain PyTorch too)
            _check_div(got, *args, LogitSpec(), div, K, tg.to(dtype), f"{kind} {dtype} ")


# Found by the error-relative criterion (2026-11-30): the C++ row epilogues once accumulated a row's ~150k fp32
# terms in a few long running sums, 20-300x less accurate than plain fp32 PyTorch at V = 151936 (every quantity
# at the base/avx2 levels).  They now sum in blocks of 512 entries; this test keeps them honest at that size.
# Few-row chunks (here one row per chunk) also sum their d_hidden product in vocabulary blocks: a BLAS
# matrix-vector product over 151936 entries was ~10x less accurate than the dense GEMM (forward KL, one thread).


@pytest.mark.isa
@pytest.mark.parametrize("what", ["reverse_kl", "forward_kl", "jsd", "logprobs_topk"])
def test_qwen_sized_vocabulary(what):
    """V = 151936 (Qwen): one workspace row per side is ~1.2 MiB; chunking and tails still exact, and every
    quantity as accurate as plain fp32 PyTorch."""
    N, H, V = 5, 8, 151936
    xs, ws, xt, wt = _inputs(N, H, V, torch.float32)
    K = _random_ids(N, V, 16, seed=7)
    tg = torch.rand(N)
    if what == "logprobs_topk":
        ids = K[:, 0].contiguous()
        got = cpu.logprobs_forward(xs, ws, ids, LogitSpec())
        _check(got, dense.logprobs(xs.double(), ws.double(), ids), dense.logprobs(xs, ws, ids),
               ("logprobs", "entropy", "lse"), torch.float32)
        ids, lp, lse = cpu.topk(xs, ws, 64, LogitSpec())
        _check_topk(ids, lp, lse, xs.double() @ ws.double().T, 64, xs @ ws.T)
        return
    for support in ("full", "teacher_topk"):
        div = DivergenceSpec(kind=what, support=support)
        got = cpu.divergence(xs, ws, xt, wt, LogitSpec(), div, K, tg)
        _check_div(got, xs, ws, xt, wt, LogitSpec(), div, K, tg, f"{support} ")


def test_nonfinite_input_is_reported_not_hidden():
    xs, ws, xt, wt = _inputs(4, 6, 50, torch.float32)
    xs[2, 1] = float("nan")
    loss = cpu.divergence(xs, ws, xt, wt, LogitSpec(), DivergenceSpec(), None, None)[0]
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3]]).all()
    lp, ent, lse = cpu.logprobs_forward(xs, ws, torch.zeros(4, dtype=torch.int64), LogitSpec())
    assert torch.isnan(lse[2]) and torch.isnan(lp[2])


def test_missing_topk_ids_is_a_value_error():
    xs, ws, xt, wt = _inputs(3, 4, 10, torch.float32)
    with pytest.raises(ValueError, match="topk_ids"):
        cpu.divergence(xs, ws, xt, wt, LogitSpec(), DivergenceSpec(support="teacher_topk"), None, None)


# ----------------------------------------------------------------------------- log-probs


@pytest.mark.isa
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("logit_name", ["plain", "temp_scale_softcap", "temp_scale"])
@pytest.mark.parametrize("grads", ["all", "lp_only", "ent_lse"])
def test_logprobs_matches_dense(logit_name, dtype, grads):
    N, H, V = 29, 12, 211
    logit = LOGITS[logit_name]
    x, w, _, _ = _inputs(N, H, V, dtype, scale=1.5)
    ids = torch.randint(0, V, (N,))
    lp, ent, lse = cpu.logprobs_forward(x, w, ids, logit)
    gs = [torch.randn(N, dtype=dtype) for _ in range(3)]
    if grads == "lp_only":
        gs[1] = gs[2] = None
    elif grads == "ent_lse":
        gs[0] = None
    dx, dw = cpu.logprobs_backward(x, w, ids, lse, ent, *gs, logit)
    exact = _dense_logprobs(x, w, ids, logit, gs)
    plain = exact if dtype == torch.float64 else _dense_logprobs(x, w, ids, logit, gs, torch.float32)
    _check((lp, ent, lse, dx, dw), (*exact[0], *exact[1:]), (*plain[0], *plain[1:]),
           ("logprobs", "entropy", "lse", "d_hidden", "d_weight"), dtype)


def test_logprobs_matches_reference_backend(small_chunks):
    N, H, V = 17, 9, 130
    logit = LOGITS["temp_scale_softcap"]
    x, w, _, _ = _inputs(N, H, V, torch.float64)
    ids = torch.randint(0, V, (N,))
    got = cpu.logprobs_forward(x, w, ids, logit)
    want = reference.logprobs_forward(x, w, ids, logit)
    for g, wv in zip(got, want):
        _close64(g, wv, "forward")
    gs = [torch.randn(N, dtype=torch.float64) for _ in range(3)]
    got = cpu.logprobs_backward(x, w, ids, want[2], want[1], *gs, logit)
    want = reference.logprobs_backward(x, w, ids, want[2], want[1], *gs, logit)
    for g, wv in zip(got, want):
        _close64(g, wv, "backward")


@pytest.mark.isa
def test_logprobs_extreme_and_tiny_vocab():
    x, w, _, _ = _inputs(8, 6, 211, torch.float32, scale=3e3)
    ids = torch.randint(0, 211, (8,))
    got = cpu.logprobs_forward(x, w, ids, LogitSpec())
    for g in got:
        assert torch.isfinite(g).all()
    exact = dense.logprobs(x.double(), w.double(), ids)
    plain = dense.logprobs(x, w, ids)  # fp32 logits of ~1e4 carry ~1e-3 error, here as in the op
    _check(got, exact, plain, ("logprobs", "entropy", "lse"), torch.float32)
    x, w, _, _ = _inputs(3, 4, 1, torch.float32)
    lp, ent, lse = cpu.logprobs_forward(x, w, torch.zeros(3, dtype=torch.int64), LogitSpec())
    assert torch.equal(lp, torch.zeros(3)) and torch.equal(ent, torch.zeros(3))
    assert_accurate(lse, (x.double() @ w.double().T)[:, 0], (x @ w.T)[:, 0], "lse at V=1")


# ----------------------------------------------------------------------------- top-k


def _check_topk(ids, lp, lse, z64, k, z_plain=None):
    """Sets with tie tolerance: returned values are the k largest (descending), ids are distinct
    and each id's true log-prob equals the returned value.  ``z64``: float64 logits of the op's
    inputs; ``z_plain``: the same logits in plain fp32 PyTorch (None for a float64 op: tight bounds)."""
    ls = z64.log_softmax(-1)
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


@pytest.mark.isa
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 7, 64, 211])
@pytest.mark.parametrize("logit_name", ["plain", "temp_scale_softcap"])
def test_topk_matches_dense(k, dtype, logit_name):
    N, H, V = 21, 10, 211
    logit = LOGITS[logit_name]
    x, w, _, _ = _inputs(N, H, V, dtype)
    ids, lp, lse = cpu.topk(x, w, k, logit)
    z = dense.logits(x.double(), w.double(), logit.temperature, logit.logit_scale, logit.softcap)
    z_plain = None if dtype == torch.float64 else dense.logits(x, w, logit.temperature, logit.logit_scale,
                                                               logit.softcap)
    _check_topk(ids, lp, lse, z, k, z_plain)


@pytest.mark.isa
def test_topk_ties():
    """Duplicated lm_head rows give exactly tied logits; any tie-consistent answer is valid."""
    x, w, _, _ = _inputs(9, 8, 211, torch.float32)
    w[100:140] = w[3]
    ids, lp, lse = cpu.topk(x, w, 50, LogitSpec())
    _check_topk(ids, lp, lse, x.double() @ w.double().T, 50, x @ w.T)
    ids1, _, _ = cpu.topk(x, w, 1, LogitSpec())
    assert ids1.shape == (9, 1)


# ----------------------------------------------------------------------------- low precision


def _fa_check(got, want64, plain_lowp, name):
    """The criterion against plain PyTorch in the inputs' low precision (the op accumulates in fp32, so it
    is usually far better; the floor is in fp32 ulps)."""
    assert_accurate(got, want64, plain_lowp, name, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_low_precision_divergence(dtype, kind):
    N, H, V = 24, 16, 211
    xs, ws, xt, wt = _inputs(N, H, V, dtype)
    div = DivergenceSpec(kind=kind, beta=0.4)
    tg = torch.rand(N)
    loss, dx, dw = cpu.divergence(xs, ws, xt, wt, LOGITS["temp_scale"], div, None, tg)
    assert loss.dtype == dx.dtype == dw.dtype == torch.float32
    want = _dense_div(xs, ws, xt, wt, LOGITS["temp_scale"], div, None, tg)
    a, b = xs.clone().requires_grad_(), ws.clone().requires_grad_()
    plain = dense.divergence(a, b, xt, wt, kind=kind, beta=0.4, temperature=1.8, logit_scale=0.6)
    (plain * tg.to(dtype)).sum().backward()
    _fa_check(loss, want[0], plain.detach(), "loss")
    _fa_check(dx, want[1], a.grad, "d_hidden")
    _fa_check(dw, want[2], b.grad, "d_weight")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logprobs_and_topk(dtype):
    N, H, V = 24, 16, 211
    x, w, _, _ = _inputs(N, H, V, dtype)
    ids = torch.randint(0, V, (N,))
    got = cpu.logprobs_forward(x, w, ids, LogitSpec())
    a, b = x.double().clone().requires_grad_(), w.double().clone().requires_grad_()
    want = dense.logprobs(a, b, ids)
    plain = dense.logprobs(x, w, ids)
    for g, wv, pv, name in zip(got, want, plain, ("logprobs", "entropy", "lse")):
        _fa_check(g, wv.detach(), pv, name)
    g_lp, g_ent = torch.randn(N), torch.randn(N)
    (want[0] * g_lp.double() + want[1] * g_ent.double()).sum().backward()
    dx, dw = cpu.logprobs_backward(x, w, ids, got[2], got[1], g_lp, g_ent, None, LogitSpec())
    pa, pb = x.clone().requires_grad_(), w.clone().requires_grad_()
    pl = dense.logprobs(pa, pb, ids)
    (pl[0] * g_lp.to(dtype) + pl[1] * g_ent.to(dtype)).sum().backward()
    _fa_check(dx, a.grad, pa.grad, "d_hidden")
    _fa_check(dw, b.grad, pb.grad, "d_weight")
    tids, tlp, tlse = cpu.topk(x, w, 5, LogitSpec())
    z64 = x.double() @ w.double().T
    plain_vals = (x @ w.T).log_softmax(-1).topk(5, dim=1).values
    _fa_check(tlp, z64.log_softmax(-1).topk(5, dim=1).values, plain_vals, "topk logprobs")


# ----------------------------------------------------------------------------- public ops


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_public_divergence_op_on_cpu_backend(reduction):
    ops = pytest.importorskip("copsd.ops")
    N, H, V = 26, 12, 211
    xs, ws, xt, wt = _inputs(N, H, V, torch.float32)
    mask = torch.rand(N) > 0.3
    up = torch.randn(N) if reduction == "none" else torch.tensor(1.7)
    outs = {}
    # exact: the reference backend (tested against the dense formulas to 1e-9) on float64 copies;
    # plain: the reference backend (plain PyTorch) in float32.
    for name, backend, dtype in (("cpu", "cpu", torch.float32), ("exact", "reference", torch.float64),
                                 ("plain", "reference", torch.float32)):
        a, b = xs.to(dtype).clone().requires_grad_(), ws.to(dtype).clone().requires_grad_()
        out = ops.linear_divergence(a, b, xt.to(dtype), wt.to(dtype), kind="jsd", beta=0.25, temperature=0.9,
                                    softcap=4.0, mask=mask, support="teacher_topk", topk=8, tail="bucket",
                                    reduction=reduction, backend=backend)
        (out * up.to(dtype)).sum().backward()
        outs[name] = (out.detach(), a.grad, b.grad)
    _check(outs["cpu"], outs["exact"], outs["plain"], DIV_NAMES, torch.float32)
    if reduction == "none":
        assert torch.equal(outs["cpu"][0][~mask], torch.zeros(int((~mask).sum())))
        assert torch.equal(outs["cpu"][1][~mask], torch.zeros_like(outs["cpu"][1][~mask]))


def test_public_logprobs_and_topk_ops_on_cpu_backend():
    ops = pytest.importorskip("copsd.ops")
    N, H, V = 20, 12, 211
    x, w, _, _ = _inputs(N, H, V, torch.float32)
    ids = torch.randint(0, V, (N,))
    res = {}
    for name, backend, dtype in (("cpu", "cpu", torch.float32), ("exact", "reference", torch.float64),
                                 ("plain", "reference", torch.float32)):
        a, b = x.to(dtype).clone().requires_grad_(), w.to(dtype).clone().requires_grad_()
        lp, ent, lse = ops.linear_logprobs(a, b, ids, temperature=1.4, return_entropy=True, backend=backend)
        (lp.sum() + 0.3 * ent.sum() - 0.1 * lse.sum()).backward()
        res[name] = (lp.detach(), ent.detach(), lse.detach(), a.grad, b.grad)
    _check(res["cpu"], res["exact"], res["plain"], ("logprobs", "entropy", "lse", "d_hidden", "d_weight"),
           torch.float32)
    t_ids, t_lp, t_lse = ops.linear_topk(x, w, 16, backend="cpu")
    _check_topk(t_ids, t_lp, t_lse, x.double() @ w.double().T, 16, x @ w.T)


def test_auto_backend_picks_cpu():
    from copsd import backends

    assert backends.get("divergence", torch.device("cpu")) is cpu
    assert "cpu" in backends.available_backends()
    assert not cpu.supports("divergence", torch.device("meta"))


# ----------------------------------------------------------------------------- ISA variants

LEVELS = ("base", "avx2", "avx512")
LEVEL_NAMES = {"base": "the baseline", "avx2": "AVX2+FMA", "avx512": "AVX-512"}


def _hardware_level():
    """The highest dispatch level this CPU supports (the C++ side's test, read from /proc/cpuinfo so that a
    COPSD_CPU_ISA cap on this process does not hide it)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(re.search(r"^flags\s*:(.*)$", f.read(), re.M).group(1).split())
    except (OSError, AttributeError):
        return cpu.isa()  # not Linux: what the extension detected
    if {"avx512f", "avx512dq", "avx512bw", "avx512vl"} <= flags and {"avx2", "fma"} <= flags:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "base"


@pytest.mark.isa
def test_forced_dispatch_level_is_in_effect():
    """In the per-level subprocesses below: the extension really runs the level it was forced to."""
    want = os.environ.get("COPSD_TEST_EXPECT_ISA")
    assert cpu.isa() in LEVELS
    if want:
        assert cpu.isa() == want


@pytest.mark.parametrize("level", LEVELS)
def test_cpu_dispatch_level(level):
    """Every dispatch level of the C++ row epilogues (picked once per process: ``COPSD_CPU_ISA`` caps it) passes
    the ``isa``-marked correctness tests (divergence kinds x supports x softcap x clip, log-probs + entropy +
    gradients, logprobs_loss, top-k with ties, extreme logits) in a subprocess.  This process's own level is
    covered by those tests directly; a level the CPU lacks is skipped, by name."""
    hw = _hardware_level()
    if LEVELS.index(level) > LEVELS.index(hw):
        pytest.skip(f"CPU has no {LEVEL_NAMES[level]}: {level} level not tested here")
    if level == cpu.isa():
        pytest.skip(f"{level} is this process's level: the isa-marked tests ran at it in-process")
    if os.environ.get("COPSD_TEST_EXPECT_ISA"):
        pytest.skip("already inside a per-level subprocess")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # One thread: what differs between levels is the row kernels, not the threading (tested in-process), and
    # a busy 2-core machine runs these small problems several times faster without OpenMP barriers.
    env = dict(os.environ, COPSD_CPU_ISA=level, COPSD_TEST_EXPECT_ISA=level, OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "isa and not slow",
           "-k", "not triton and not reference", "tests/test_backend_cpu.py", "tests/test_logprobs_loss.py"]
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    tail = res.stdout[-4000:] + res.stderr[-2000:]
    assert res.returncode == 0, f"COPSD_CPU_ISA={level}:\n{tail}"
    passed = re.search(r"(\d+) passed", res.stdout)
    assert passed and int(passed.group(1)) >= 100, f"COPSD_CPU_ISA={level}: too few tests ran\n{tail}"
