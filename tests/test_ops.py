"""Public loss ops against the dense float64 formulas (tests/dense.py): values and gradients."""

import dense
import pytest
import torch
from criteria import assert_accurate

from copsd.ops import available_backends, linear_divergence, linear_logprobs, linear_topk

CPU_BACKENDS = [b for b in ("reference", "cpu") if b in available_backends()]
F64 = torch.float64

KIND_SUPPORT = [
    ("reverse_kl", "full", None), ("forward_kl", "full", None), ("jsd", "full", None),
    ("reverse_kl", "teacher_topk", "bucket"), ("forward_kl", "teacher_topk", "bucket"),
    ("jsd", "teacher_topk", "bucket"), ("reverse_kl", "teacher_topk", "renorm"),
    ("forward_kl", "teacher_topk", "renorm"), ("jsd", "teacher_topk", "renorm"),
    ("reverse_kl", "teacher_topk", "none"), ("forward_kl", "teacher_topk", "none"),
]
LOGIT_OPTS = [
    dict(),
    dict(temperature=0.7, logit_scale=1.3),
    dict(temperature=2.0, softcap=5.0),
]


def _inputs(N, H, V, scale=1.0, dtype=F64, Ht=None):
    xs = (torch.randn(N, H, dtype=dtype) * scale).requires_grad_()
    ws = torch.randn(V, H, dtype=dtype).requires_grad_()
    Ht = Ht or H
    xt = torch.randn(N, Ht, dtype=dtype) * scale
    wt = torch.randn(V, Ht, dtype=dtype)
    return xs, ws, xt, wt


def _teacher_ids(xt, wt, k, opts):
    return dense.logits(xt, wt, **opts).topk(k, dim=1).indices


def _check(got, want, rtol=1e-9, atol=1e-9):
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind,support,tail", KIND_SUPPORT)
@pytest.mark.parametrize("opts", LOGIT_OPTS, ids=["plain", "temp-scale", "softcap"])
def test_divergence_per_token_grad(backend, kind, support, tail, opts, small_chunks):
    N, H, V, k = 37, 12, 203, 9
    xs, ws, xt, wt = _inputs(N, H, V)
    extra = {}
    if support == "teacher_topk":
        extra = dict(support=support, tail=tail, topk=_teacher_ids(xt, wt, k, opts))
    mask = torch.rand(N) > 0.25
    got = linear_divergence(xs, ws, xt, wt, kind=kind, beta=0.3, mask=mask, backend=backend, **opts, **extra)
    up = torch.randn(N, dtype=F64)
    gx, gw = torch.autograd.grad((got * up).sum(), (xs, ws))

    want = dense.divergence(xs, ws, xt, wt, kind=kind, beta=0.3, support=support, tail=tail or "bucket",
                            topk_ids=extra.get("topk"), **opts) * mask
    rx, rw = torch.autograd.grad((want * up).sum(), (xs, ws))
    _check(got, want)
    _check(gx, rx)
    _check(gw, rw)
    assert (got[~mask] == 0).all() and (gx[~mask] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind,support,tail", [("reverse_kl", "full", None), ("jsd", "full", None),
                                                ("forward_kl", "teacher_topk", "bucket")])
def test_divergence_reductions_and_term_clip(backend, reduction, kind, support, tail, small_chunks):
    N, H, V, k = 29, 8, 130, 5
    xs, ws, xt, wt = _inputs(N, H, V, scale=2.0)
    extra = dict(support=support, tail=tail, topk=_teacher_ids(xt, wt, k, {})) if tail else {}
    mask = torch.rand(N) > 0.3
    for clip in (None, 0.05):
        got = linear_divergence(xs, ws, xt, wt, kind=kind, mask=mask, reduction=reduction, term_clip=clip,
                                backend=backend, **extra)
        gx, gw = torch.autograd.grad(got * 1.7, (xs, ws))
        per = dense.divergence(xs, ws, xt, wt, kind=kind, support=support, tail=tail or "bucket",
                               topk_ids=extra.get("topk"), term_clip=clip)
        want = (per * mask).sum()
        if reduction == "mean":
            want = want / mask.sum()
        rx, rw = torch.autograd.grad(want * 1.7, (xs, ws))
        _check(got, want)
        _check(gx, rx)
        _check(gw, rw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_divergence_topk_as_int_and_teacher_hidden_size(backend, small_chunks):
    # Teacher with another hidden size (same vocabulary); topk given as an int.
    N, H, Ht, V, k = 11, 6, 10, 97, 7
    xs, ws, xt, wt = _inputs(N, H, V, Ht=Ht)
    got = linear_divergence(xs, ws, xt, wt, support="teacher_topk", topk=k, backend=backend, temperature=1.5)
    ids = _teacher_ids(xt, wt, k, dict(temperature=1.5))
    want = dense.divergence(xs, ws, xt, wt, support="teacher_topk", topk_ids=ids, temperature=1.5)
    _check(got, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_divergence_one_token_and_one_word_vocab(backend):
    xs, ws, xt, wt = _inputs(1, 5, 7)
    _check(linear_divergence(xs, ws, xt, wt, backend=backend), dense.divergence(xs, ws, xt, wt))
    xs, ws, xt, wt = _inputs(4, 5, 1)  # V = 1: both distributions are the point mass
    out = linear_divergence(xs, ws, xt, wt, kind="jsd", backend=backend)
    _check(out, torch.zeros(4, dtype=F64))
    out = linear_divergence(xs, ws, xt, wt, support="teacher_topk", topk=1, backend=backend)
    _check(out, torch.zeros(4, dtype=F64))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_divergence_extreme_logits(backend, kind, small_chunks):
    # Logits of order 1e4: any non-stabilised exp overflows.
    N, H, V = 9, 4, 150
    xs, ws, xt, wt = _inputs(N, H, V, scale=3e3)
    got = linear_divergence(xs, ws, xt, wt, kind=kind, backend=backend)
    gx, gw = torch.autograd.grad(got.sum(), (xs, ws))
    want = dense.divergence(xs, ws, xt, wt, kind=kind)
    rx, rw = torch.autograd.grad(want.sum(), (xs, ws))
    assert torch.isfinite(got).all()
    _check(got, want, rtol=1e-7, atol=1e-6)
    _check(gx, rx, rtol=1e-7, atol=1e-6)
    _check(gw, rw, rtol=1e-7, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_identical_student_and_teacher_give_zero(backend, kind, small_chunks):
    xs, ws, _, _ = _inputs(20, 8, 100)
    out = linear_divergence(xs, ws, xs.detach().clone(), ws.detach().clone(), kind=kind, backend=backend)
    gx, gw = torch.autograd.grad(out.sum(), (xs, ws))
    _check(out, torch.zeros(20, dtype=F64), atol=1e-12, rtol=0)
    _check(gx, torch.zeros_like(gx), atol=1e-12, rtol=0)
    _check(gw, torch.zeros_like(gw), atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_self_distillation_stop_gradient(backend, small_chunks):
    # student_weight IS teacher_weight: only the student path may carry gradient.
    N, H, V = 13, 6, 90
    xs = torch.randn(N, H, dtype=F64, requires_grad=True)
    xt = torch.randn(N, H, dtype=F64, requires_grad=True)
    w = torch.randn(V, H, dtype=F64, requires_grad=True)
    out = linear_divergence(xs, w, xt, w, backend=backend, reduction="sum")
    gx, gw = torch.autograd.grad(out, (xs, w))
    w2 = w.detach().clone().requires_grad_()
    out2 = linear_divergence(xs, w2, xt.detach(), w.detach().clone(), backend=backend, reduction="sum")
    rx, rw = torch.autograd.grad(out2, (xs, w2))
    _check(gx, rx)
    _check(gw, rw)
    out = linear_divergence(xs, w, xt, w, backend=backend, reduction="sum")
    assert torch.autograd.grad(out, xt, allow_unused=True)[0] is None


def test_direction_is_named_not_inferred():
    # Hand-made: student q = (0.9, 0.1), teacher p = (0.5, 0.5) via one-hot hidden states.
    q = torch.tensor([0.9, 0.1], dtype=F64)
    p = torch.tensor([0.5, 0.5], dtype=F64)
    eye = torch.eye(2, dtype=F64)
    xs, xt = eye[:1], eye[:1]
    ws = torch.stack([q.log(), torch.zeros(2, dtype=F64)], 1)  # logits for hidden e0 = log q
    wt = torch.stack([p.log(), torch.zeros(2, dtype=F64)], 1)
    rkl = (q * (q / p).log()).sum()
    fkl = (p * (p / q).log()).sum()
    assert abs(rkl - fkl) > 0.05
    _check(linear_divergence(xs, ws, xt, wt, kind="reverse_kl")[0], rkl)
    _check(linear_divergence(xs, ws, xt, wt, kind="forward_kl")[0], fkl)
    m = 0.5 * (q + p)
    jsd = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
    _check(linear_divergence(xs, ws, xt, wt, kind="jsd", beta=0.5)[0], jsd)


def test_topk_none_tail_is_partial_sum_and_bucket_is_a_divergence(small_chunks):
    # The raw partial sum can go negative; with the tail bucket the value is a true divergence (>= 0).
    xs, ws, xt, wt = _inputs(64, 6, 120, scale=1.5)
    ids = _teacher_ids(xt, wt, 3, {})
    none = linear_divergence(xs, ws, xt, wt, support="teacher_topk", topk=ids, tail="none")
    bucket = linear_divergence(xs, ws, xt, wt, support="teacher_topk", topk=ids, tail="bucket")
    assert (bucket >= -1e-12).all()
    assert (none < 0).any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_masked_mean_is_zero_not_nan(backend):
    xs, ws, xt, wt = _inputs(6, 4, 30)
    mask = torch.zeros(6, dtype=torch.bool)
    out = linear_divergence(xs, ws, xt, wt, mask=mask, reduction="mean", backend=backend)
    gx, gw = torch.autograd.grad(out, (xs, ws))
    assert out.item() == 0.0
    assert (gx == 0).all() and (gw == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_rows_may_hold_garbage(backend):
    xs, ws, xt, wt = _inputs(6, 4, 30)
    with torch.no_grad():
        xs[2] = float("nan")
        xt[4] = float("inf")
    mask = torch.ones(6, dtype=torch.bool)
    mask[2] = mask[4] = False
    out = linear_divergence(xs, ws, xt, wt, mask=mask, reduction="mean", backend=backend)
    gx, gw = torch.autograd.grad(out, (xs, ws))
    assert torch.isfinite(out) and torch.isfinite(gx).all() and torch.isfinite(gw).all()
    assert (gx[2] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_finite_input_is_reported_not_hidden(backend):
    xs, ws, xt, wt = _inputs(5, 4, 30)
    with torch.no_grad():
        xs[1, 0] = float("nan")
    out = linear_divergence(xs, ws, xt, wt, backend=backend)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2, 3, 4]]).all()
    assert torch.isnan(linear_divergence(xs, ws, xt, wt, reduction="mean", backend=backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck(backend):
    N, H, V = 4, 3, 11
    xs, ws, xt, wt = _inputs(N, H, V)
    ids = _teacher_ids(xt, wt, 3, {})
    for kw in (dict(kind="reverse_kl", softcap=2.0, temperature=0.8), dict(kind="jsd", beta=0.7),
               dict(kind="forward_kl", support="teacher_topk", topk=ids, tail="bucket"),
               dict(kind="reverse_kl", support="teacher_topk", topk=ids, tail="renorm")):
        def f(a, b, kw=kw):
            return linear_divergence(a, b, xt, wt, backend=backend, **kw)
        assert torch.autograd.gradcheck(f, (xs, ws))
    ids1 = torch.randint(0, V, (N,))
    g = lambda a, b: linear_logprobs(a, b, ids1, return_entropy=True, softcap=3.0, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(g, (xs, ws))


# ----------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("opts", LOGIT_OPTS, ids=["plain", "temp-scale", "softcap"])
@pytest.mark.parametrize("scale", [1.0, 2e3])
def test_logprobs_entropy_lse(backend, opts, scale, small_chunks):
    N, H, V = 41, 7, 211
    x = (torch.randn(N, H, dtype=F64) * scale).requires_grad_()
    w = torch.randn(V, H, dtype=F64, requires_grad=True)
    ids = torch.randint(0, V, (N,))
    lp, ent, lse = linear_logprobs(x, w, ids, return_entropy=True, backend=backend, **opts)
    rlp, rent, rlse = dense.logprobs(x, w, ids, **opts)
    tol = dict(rtol=1e-8, atol=1e-8 * scale)
    _check(lp, rlp, **tol)
    _check(ent, rent, **tol)
    _check(lse, rlse, **tol)
    ups = [torch.randn(N, dtype=F64) for _ in range(3)]
    got = torch.autograd.grad(sum((o * u).sum() for o, u in zip((lp, ent, lse), ups)), (x, w))
    want = torch.autograd.grad(sum((o * u).sum() for o, u in zip((rlp, rent, rlse), ups)), (x, w))
    for g, r in zip(got, want):
        _check(g, r, **tol)
    assert linear_logprobs(x, w, ids, backend=backend)[1] is None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_logprobs_float32_and_int32_ids(backend):
    x = torch.randn(10, 8)
    w = torch.randn(50, 8)
    ids = torch.randint(0, 50, (10,), dtype=torch.int32)
    lp, _, _ = linear_logprobs(x, w, ids, backend=backend)
    assert lp.dtype == torch.float32
    assert_accurate(lp, dense.logprobs(x.double(), w.double(), ids.long())[0], dense.logprobs(x, w, ids.long())[0],
                    "float32 logprobs")


# ----------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k", [1, 5, 64, 150])
def test_topk(backend, k, small_chunks):
    N, H, V = 23, 9, 150
    x, w = torch.randn(N, H, dtype=F64), torch.randn(V, H, dtype=F64)
    ids, lp, lse = linear_topk(x, w, k, temperature=0.9, softcap=4.0, backend=backend)
    ls = dense.logits(x, w, 0.9, 1.0, 4.0).log_softmax(-1)
    want_lp, _ = ls.topk(k, dim=1)
    assert ids.shape == (N, k) and ids.dtype == torch.int64
    _check(lp, want_lp)                              # values and order
    _check(ls.gather(1, ids), lp)                    # ids point at those values (ties may permute ids)
    assert (lp[:, 1:] <= lp[:, :-1]).all()
    _check(lse, dense.logits(x, w, 0.9, 1.0, 4.0).logsumexp(-1))


def test_topk_ties_are_accepted_as_sets():
    x = torch.ones(3, 1, dtype=F64)
    w = torch.ones(10, 1, dtype=F64)  # every logit equal
    ids, lp, _ = linear_topk(x, w, 4)
    assert all(len(set(r.tolist())) == 4 for r in ids)
    _check(lp, torch.full((3, 4), -torch.log(torch.tensor(10.0, dtype=F64)).item(), dtype=F64))
