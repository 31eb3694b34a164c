"""C++ CPU backend (copsd._C) against dense float64 formulas and the reference backend.

Ground truth: the dense ``[N, V]`` float64 formulas in ``tests/dense.py`` (written from the
definitions in DESIGN.md) with gradients from autograd, plus a few closed forms written in
this file.  The workspace is shrunk so every test crosses row-chunk (and up-cast block)
boundaries.  float64 runs check the semantics to ~1e-9; float32 runs check the vectorised
float path (polynomial exp, fp32 accumulation); bf16/fp16 use the FlashAttention criterion.
"""

import os
import subprocess
import sys

import dense
import pytest
import torch

from copsd.backends import cpu, reference
from copsd.ops._spec import DivergenceSpec, LogitSpec

pytestmark = pytest.mark.skipif(not cpu.available(), reason="copsd._C (C++ CPU extension) is not built")

LOGITS = {
    "plain": LogitSpec(),
    "temp_scale_softcap": LogitSpec(temperature=0.7, logit_scale=1.3, softcap=3.0),
    "temp_scale": LogitSpec(temperature=1.8, logit_scale=0.6),
}
SUPPORTS = [("full", "bucket"), ("teacher_topk", "bucket"), ("teacher_topk", "renorm"), ("teacher_topk", "none")]
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-4, atol=2e-5)}


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


_dense_div = dense.divergence_grads  # float64 loss and gradients, shared with the Triton tests


def _close(got, want, dtype, what):
    torch.testing.assert_close(got.double(), want.double(), **TOL[dtype], msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- divergence


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
    want_loss, want_dx, want_dw = _dense_div(xs, ws, xt, wt, logit, div, K, tg)
    if clip is not None:  # the clip must actually bind somewhere, or the test proves nothing
        unclipped = _dense_div(xs, ws, xt, wt, logit, DivergenceSpec(kind, 0.3, support, tail), K, tg)[0]
        assert (unclipped - want_loss).abs().max() > 1e-6
    _close(loss, want_loss, dtype, "loss")
    _close(dx, want_dx, dtype, "d_hidden")
    _close(dw, want_dw, dtype, "d_weight")
    # Loss without gradient is the same number.
    loss2, none_dx, none_dw = cpu.divergence(xs, ws, xt, wt, logit, div, K, None)
    assert none_dx is None and none_dw is None
    _close(loss2, want_loss, dtype, "loss (no grad)")


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
    for g, w, name in zip(got, want, ("loss", "d_hidden", "d_weight")):
        _close(g, w, torch.float64, name)


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
        want = _dense_div(xs, ws, xt, wt, LOGITS["temp_scale"], div, K, tg)
        for g, w, name in zip(got, want, ("loss", "d_hidden", "d_weight")):
            _close(g, w, torch.float32, f"{support} {name}")


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
    _close(got, want, torch.float64, "KL(q||p)")
    fwd = cpu.divergence(xs, ws, xt, wt, LogitSpec(), DivergenceSpec(kind="forward_kl"), None, None)[0]
    _close(fwd, (p * (p.log() - q.log())).sum(-1), torch.float64, "KL(p||q)")


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
        atol = 1e-12 if dtype == torch.float64 else 2e-6
        assert loss.abs().max() <= atol, (support, tail, loss)
        if tail == "none":  # the raw partial sum is not a divergence: its gradient need not vanish
            continue
        assert dx.abs().max() <= atol and dw.abs().max() <= atol, (support, tail)
    # And a different teacher with N = 1 still matches the dense formula.
    xs, ws, xt, wt = _inputs(N, H, V, dtype)
    div = DivergenceSpec(kind=kind)
    tg = torch.tensor([1.3], dtype=dtype)
    got = cpu.divergence(xs, ws, xt, wt, LogitSpec(), div, None, tg)
    want = _dense_div(xs, ws, xt, wt, LogitSpec(), div, None, tg)
    for g, w, name in zip(got, want, ("loss", "d_hidden", "d_weight")):
        _close(g, w, dtype, name)


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
        for g, w, name in zip(got, full, ("loss", "d_hidden", "d_weight")):  # k = V is the full divergence
            _close(g, w, torch.float64, f"{tail} {name}")


@pytest.mark.parametrize("support,tail", SUPPORTS)
def test_extreme_logits(support, tail):
    """Logits of +-1e4 scale: finite, exact-enough in fp32, no NaN from exp underflow."""
    N, H, V = 11, 8, 211
    xs, ws, xt, wt = _inputs(N, H, V, torch.float64, scale=2.0e3, teacher_scale=1.5e3)
    assert (xs @ ws.T).abs().max() > 5e3
    K = _random_ids(N, V, 6, seed=3) if support == "teacher_topk" else None
    tg = torch.rand(N, dtype=torch.float64)
    for kind in ("reverse_kl", "forward_kl", "jsd"):
        div = DivergenceSpec(kind=kind, support=support, tail=tail)
        want = _dense_div(xs, ws, xt, wt, LogitSpec(), div, K, tg)
        for dtype in (torch.float64, torch.float32):
            got = cpu.divergence(*[t.to(dtype) for t in (xs, ws, xt, wt)], LogitSpec(), div, K, tg.to(dtype))
            for g, w, name in zip(got, want, ("loss", "d_hidden", "d_weight")):
                assert torch.isfinite(g).all(), (kind, dtype, name)
                scale = 1.0 + w.abs().max().item()
                tol = 1e-9 if dtype == torch.float64 else 1e-3  # fp32 logits of 1e4 carry ~1e-3 error
                assert (g.double() - w).abs().max().item() <= tol * scale, (kind, dtype, name)


def test_qwen_sized_vocabulary():
    """V = 151936 (Qwen): one workspace row per side is ~1.2 MiB; chunking and tails still exact."""
    N, H, V = 5, 8, 151936
    xs, ws, xt, wt = _inputs(N, H, V, torch.float32)
    K = _random_ids(N, V, 16, seed=7)
    tg = torch.rand(N)
    for support in ("full", "teacher_topk"):
        div = DivergenceSpec(kind="reverse_kl", support=support)
        got = cpu.divergence(xs, ws, xt, wt, LogitSpec(), div, K, tg)
        want = _dense_div(xs, ws, xt, wt, LogitSpec(), div, K, tg)
        for g, w, name in zip(got, want, ("loss", "d_hidden", "d_weight")):
            _close(g, w, torch.float32, f"{support} {name}")
    ids, lp, lse = cpu.topk(xs, ws, 64, LogitSpec())
    _check_topk(ids, lp, lse, xs.double() @ ws.double().T, 64, 2e-5)


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("logit_name", ["plain", "temp_scale_softcap", "temp_scale"])
@pytest.mark.parametrize("grads", ["all", "lp_only", "ent_lse"])
def test_logprobs_matches_dense(logit_name, dtype, grads):
    N, H, V = 29, 12, 211
    logit = LOGITS[logit_name]
    x, w, _, _ = _inputs(N, H, V, dtype, scale=1.5)
    ids = torch.randint(0, V, (N,))
    lp, ent, lse = cpu.logprobs_forward(x, w, ids, logit)
    a = x.double().clone().requires_grad_()
    b = w.double().clone().requires_grad_()
    want = dense.logprobs(a, b, ids, logit.temperature, logit.logit_scale, logit.softcap)
    for g, wv, name in zip((lp, ent, lse), want, ("logprobs", "entropy", "lse")):
        _close(g, wv.detach(), dtype, name)
    gs = [torch.randn(N, dtype=dtype) for _ in range(3)]
    if grads == "lp_only":
        gs[1] = gs[2] = None
    elif grads == "ent_lse":
        gs[0] = None
    obj = sum((wv * g.double()).sum() for wv, g in zip(want, gs) if g is not None)
    obj.backward()
    dx, dw = cpu.logprobs_backward(x, w, ids, lse, ent, *gs, logit)
    _close(dx, a.grad, dtype, "d_hidden")
    _close(dw, b.grad, dtype, "d_weight")


def test_logprobs_matches_reference_backend(small_chunks):
    N, H, V = 17, 9, 130
    logit = LOGITS["temp_scale_softcap"]
    x, w, _, _ = _inputs(N, H, V, torch.float64)
    ids = torch.randint(0, V, (N,))
    got = cpu.logprobs_forward(x, w, ids, logit)
    want = reference.logprobs_forward(x, w, ids, logit)
    for g, wv in zip(got, want):
        _close(g, wv, torch.float64, "forward")
    gs = [torch.randn(N, dtype=torch.float64) for _ in range(3)]
    got = cpu.logprobs_backward(x, w, ids, want[2], want[1], *gs, logit)
    want = reference.logprobs_backward(x, w, ids, want[2], want[1], *gs, logit)
    for g, wv in zip(got, want):
        _close(g, wv, torch.float64, "backward")


def test_logprobs_extreme_and_tiny_vocab():
    x, w, _, _ = _inputs(8, 6, 211, torch.float64, scale=3e3)
    ids = torch.randint(0, 211, (8,))
    want = dense.logprobs(x, w, ids)
    got = cpu.logprobs_forward(x.float(), w.float(), ids, LogitSpec())
    for g, wv, name in zip(got, want, ("logprobs", "entropy", "lse")):
        assert torch.isfinite(g).all()
        assert (g.double() - wv).abs().max() <= 1e-3 * (1 + wv.abs().max()), name
    x, w, _, _ = _inputs(3, 4, 1, torch.float32)
    lp, ent, lse = cpu.logprobs_forward(x, w, torch.zeros(3, dtype=torch.int64), LogitSpec())
    assert torch.equal(lp, torch.zeros(3)) and torch.equal(ent, torch.zeros(3))
    _close(lse, (x @ w.T)[:, 0], torch.float32, "lse at V=1")


# ----------------------------------------------------------------------------- top-k


def _check_topk(ids, lp, lse, z64, k, atol):
    """Sets with tie tolerance: returned values are the k largest (descending), ids are distinct
    and each id's true log-prob equals the returned value."""
    ls = z64.log_softmax(-1)
    want_vals = ls.topk(k, dim=1).values
    assert ids.shape == lp.shape == (z64.shape[0], k) and ids.dtype == torch.int64
    torch.testing.assert_close(lp.double(), want_vals, rtol=0, atol=atol)
    torch.testing.assert_close(ls.gather(1, ids), want_vals, rtol=0, atol=atol)
    assert (lp[:, 1:] <= lp[:, :-1]).all()
    assert (ids.sort(1).values.diff(dim=1) > 0).all()
    torch.testing.assert_close(lse.double(), z64.logsumexp(-1), rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 7, 64, 211])
@pytest.mark.parametrize("logit_name", ["plain", "temp_scale_softcap"])
def test_topk_matches_dense(k, dtype, logit_name):
    N, H, V = 21, 10, 211
    logit = LOGITS[logit_name]
    x, w, _, _ = _inputs(N, H, V, dtype)
    ids, lp, lse = cpu.topk(x, w, k, logit)
    z = dense.logits(x.double(), w.double(), logit.temperature, logit.logit_scale, logit.softcap)
    _check_topk(ids, lp, lse, z, k, 1e-12 if dtype == torch.float64 else 2e-5)


def test_topk_ties():
    """Duplicated lm_head rows give exactly tied logits; any tie-consistent answer is valid."""
    x, w, _, _ = _inputs(9, 8, 211, torch.float32)
    w[100:140] = w[3]
    ids, lp, lse = cpu.topk(x, w, 50, LogitSpec())
    _check_topk(ids, lp, lse, x.double() @ w.double().T, 50, 2e-5)
    ids1, _, _ = cpu.topk(x, w, 1, LogitSpec())
    assert ids1.shape == (9, 1)


# ----------------------------------------------------------------------------- low precision


def _fa_check(got, want64, plain_lowp, name, slack=1e-6):
    """FlashAttention criterion: kernel error <= 2 x error of plain PyTorch in that precision."""
    err = (got.double() - want64).abs().max().item()
    base = (plain_lowp.double() - want64).abs().max().item()
    assert err <= 2 * base + slack, f"{name}: kernel error {err:.3g} > 2 x plain low-precision error {base:.3g}"


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
    for backend in ("cpu", "reference"):
        a, b = xs.clone().requires_grad_(), ws.clone().requires_grad_()
        out = ops.linear_divergence(a, b, xt, wt, kind="jsd", beta=0.25, temperature=0.9, softcap=4.0,
                                    mask=mask, support="teacher_topk", topk=8, tail="bucket",
                                    reduction=reduction, backend=backend)
        (out * up).sum().backward()
        outs[backend] = (out.detach(), a.grad, b.grad)
    for g, w, name in zip(outs["cpu"], outs["reference"], ("loss", "d_hidden", "d_weight")):
        torch.testing.assert_close(g, w, rtol=2e-4, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}")
    if reduction == "none":
        assert torch.equal(outs["cpu"][0][~mask], torch.zeros(int((~mask).sum())))
        assert torch.equal(outs["cpu"][1][~mask], torch.zeros_like(outs["cpu"][1][~mask]))


def test_public_logprobs_and_topk_ops_on_cpu_backend():
    ops = pytest.importorskip("copsd.ops")
    N, H, V = 20, 12, 211
    x, w, _, _ = _inputs(N, H, V, torch.float32)
    ids = torch.randint(0, V, (N,))
    res = {}
    for backend in ("cpu", "reference"):
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        lp, ent, lse = ops.linear_logprobs(a, b, ids, temperature=1.4, return_entropy=True, backend=backend)
        (lp.sum() + 0.3 * ent.sum() - 0.1 * lse.sum()).backward()
        res[backend] = (lp.detach(), ent.detach(), lse.detach(), a.grad, b.grad)
    for g, wv in zip(res["cpu"], res["reference"]):
        torch.testing.assert_close(g, wv, rtol=2e-4, atol=2e-5)
    t_ids, t_lp, t_lse = ops.linear_topk(x, w, 16, backend="cpu")
    _check_topk(t_ids, t_lp, t_lse, x.double() @ w.double().T, 16, 2e-5)


def test_auto_backend_picks_cpu():
    from copsd import backends

    assert backends.get("divergence", torch.device("cpu")) is cpu
    assert "cpu" in backends.available_backends()
    assert not cpu.supports("divergence", torch.device("meta"))


# ----------------------------------------------------------------------------- ISA variants


@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_other_isa_variants(isa):
    """The AVX2 and baseline builds of the row epilogues (picked at run time) give the same
    answers; run in a subprocess because the ISA is chosen once per process."""
    if isa == "avx2" and cpu.isa() == "base":
        pytest.skip("CPU has no AVX2")
    code = (
        "import sys, torch; sys.path.insert(0, 'tests'); import dense\n"
        "from copsd.backends import cpu\n"
        "from copsd.ops._spec import LogitSpec, DivergenceSpec\n"
        f"assert cpu.isa() == '{isa}', cpu.isa()\n"
        "torch.manual_seed(0); N, H, V = 13, 8, 157\n"
        "xs, xt = torch.randn(N, H), torch.randn(N, H); ws, wt = torch.randn(V, H), torch.randn(V, H)\n"
        "ids = torch.randint(0, V, (N,)); K = torch.rand(N, V).argsort(1)[:, :5]\n"
        "for kind in ('reverse_kl', 'forward_kl', 'jsd'):\n"
        "  for sup, tail, sc in (('full', 'bucket', None), ('full', 'bucket', 2.0),\n"
        "                       ('teacher_topk', 'bucket', None)):\n"
        "    d = DivergenceSpec(kind=kind, support=sup, tail=tail); ls = LogitSpec(softcap=sc)\n"
        "    loss = cpu.divergence(xs, ws, xt, wt, ls, d, K, None)[0]\n"
        "    want = dense.divergence(xs.double(), ws.double(), xt.double(), wt.double(), kind=kind, softcap=sc,\n"
        "                            support=sup, topk_ids=K, tail=tail)\n"
        "    assert torch.allclose(loss.double(), want, rtol=1e-4, atol=1e-5), (kind, sup)\n"
        "lp = cpu.logprobs_forward(xs, ws, ids, LogitSpec())\n"
        "want = dense.logprobs(xs.double(), ws.double(), ids)\n"
        "assert all(torch.allclose(a.double(), b, rtol=1e-4, atol=1e-5) for a, b in zip(lp, want))\n"
        "ws[40:60] = ws[3]  # exact ties\n"
        "for k in (1, 7, 33):\n"
        "  t_ids, t_lp, t_lse = cpu.topk(xs, ws, k, LogitSpec())\n"
        "  ls = (xs.double() @ ws.double().T).log_softmax(-1)\n"
        "  assert torch.allclose(t_lp.double(), ls.topk(k, dim=1).values, atol=2e-5), k\n"
        "  assert torch.allclose(ls.gather(1, t_ids), ls.topk(k, dim=1).values, atol=2e-5), k\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, COPSD_CPU_ISA=isa, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
