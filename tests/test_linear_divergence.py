"""``linear_divergence``: per-token divergences between student and teacher (values and student gradients) on
every backend.

Ground truth: the dense float64 definitions of ``copsd.reference`` (through autograd for gradients) and a few
closed forms written here; float32 and lower by the error-relative criterion of ``tests/criteria.py``.
Sections: the public op on the CPU backends (reference, C++: reductions, masks, top-k supports, stop-gradient,
gradcheck), the C++ backend's kernel-level function (``isa``-marked tests rerun per dispatch level by
``test_backend_cpu.py::test_cpu_dispatch_level``; the V = 151936 case is in ``test_backend_cpu.py``), the
Triton backend (both GPU paths; interpreter without a GPU; ``gpu``-marked tests at larger shapes).
"""

import pytest
import torch
from oplib import (
    CPU,
    CPU_BACKENDS,
    DEV,
    DIV_NAMES,
    F64,
    KIND_SUPPORT,
    LOGIT_OPTS,
    LOGITS,
    SPECS,
    SUPPORTS,
    TRITON,
    bf16_criterion,
    check_accurate,
    check_close,
    check_div,
    check_topk,
    close,
    close64,
    cpu_inputs,
    dense,
    exact_order,
    fa_check,
    op_inputs,
    rand_lm,
    random_ids,
    spec_kwargs,
    teacher_ids,
    z64_of,
)

from copsd.backends import cpu, reference
from copsd.backends import reference as ref
from copsd.backends import triton as tri
from copsd.ops import linear_divergence, linear_logprobs
from copsd.ops._spec import DivergenceSpec, LogitSpec

# ----------------------------------------------------------------------------- public op (reference, C++)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind,support,tail", KIND_SUPPORT)
@pytest.mark.parametrize("opts", LOGIT_OPTS, ids=["plain", "temp-scale", "softcap"])
def test_divergence_per_token_grad(backend, kind, support, tail, opts, small_chunks):
    N, H, V, k = 37, 12, 203, 9
    xs, ws, xt, wt = op_inputs(N, H, V)
    extra = {}
    if support == "teacher_topk":
        extra = dict(support=support, tail=tail, topk=teacher_ids(xt, wt, k, opts))
    mask = torch.rand(N) > 0.25
    got = linear_divergence(xs, ws, xt, wt, kind=kind, beta=0.3, mask=mask, backend=backend, **opts, **extra)
    up = torch.randn(N, dtype=F64)
    gx, gw = torch.autograd.grad((got * up).sum(), (xs, ws))

    want = dense.divergence(xs, ws, xt, wt, kind=kind, beta=0.3, support=support, tail=tail or "bucket",
                            topk_ids=extra.get("topk"), **opts) * mask
    rx, rw = torch.autograd.grad((want * up).sum(), (xs, ws))
    check_close(got, want)
    check_close(gx, rx)
    check_close(gw, rw)
    assert (got[~mask] == 0).all() and (gx[~mask] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind,support,tail", [("reverse_kl", "full", None), ("jsd", "full", None),
                                                ("forward_kl", "teacher_topk", "bucket")])
def test_divergence_reductions_and_term_clip(backend, reduction, kind, support, tail, small_chunks):
    N, H, V, k = 29, 8, 130, 5
    xs, ws, xt, wt = op_inputs(N, H, V, scale=2.0)
    extra = dict(support=support, tail=tail, topk=teacher_ids(xt, wt, k, {})) if tail else {}
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
        check_close(got, want)
        check_close(gx, rx)
        check_close(gw, rw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_divergence_topk_as_int_and_teacher_hidden_size(backend, small_chunks):
    # Teacher with another hidden size (same vocabulary); topk given as an int.
    N, H, Ht, V, k = 11, 6, 10, 97, 7
    xs, ws, xt, wt = op_inputs(N, H, V, Ht=Ht)
    got = linear_divergence(xs, ws, xt, wt, support="teacher_topk", topk=k, backend=backend, temperature=1.5)
    ids = teacher_ids(xt, wt, k, dict(temperature=1.5))
    want = dense.divergence(xs, ws, xt, wt, support="teacher_topk", topk_ids=ids, temperature=1.5)
    check_close(got, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_divergence_one_token_and_one_word_vocab(backend):
    xs, ws, xt, wt = op_inputs(1, 5, 7)
    check_close(linear_divergence(xs, ws, xt, wt, backend=backend), dense.divergence(xs, ws, xt, wt))
    xs, ws, xt, wt = op_inputs(4, 5, 1)  # V = 1: both distributions are the point mass
    out = linear_divergence(xs, ws, xt, wt, kind="jsd", backend=backend)
    check_close(out, torch.zeros(4, dtype=F64))
    out = linear_divergence(xs, ws, xt, wt, support="teacher_topk", topk=1, backend=backend)
    check_close(out, torch.zeros(4, dtype=F64))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_divergence_extreme_logits(backend, kind, small_chunks):
    # Logits of order 1e4: any non-stabilised exp overflows.
    N, H, V = 9, 4, 150
    xs, ws, xt, wt = op_inputs(N, H, V, scale=3e3)
    got = linear_divergence(xs, ws, xt, wt, kind=kind, backend=backend)
    gx, gw = torch.autograd.grad(got.sum(), (xs, ws))
    want = dense.divergence(xs, ws, xt, wt, kind=kind)
    rx, rw = torch.autograd.grad(want.sum(), (xs, ws))
    assert torch.isfinite(got).all()
    check_close(got, want, rtol=1e-7, atol=1e-6)
    check_close(gx, rx, rtol=1e-7, atol=1e-6)
    check_close(gw, rw, rtol=1e-7, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_identical_student_and_teacher_give_zero(backend, kind, small_chunks):
    xs, ws, _, _ = op_inputs(20, 8, 100)
    out = linear_divergence(xs, ws, xs.detach().clone(), ws.detach().clone(), kind=kind, backend=backend)
    gx, gw = torch.autograd.grad(out.sum(), (xs, ws))
    check_close(out, torch.zeros(20, dtype=F64), atol=1e-12, rtol=0)
    check_close(gx, torch.zeros_like(gx), atol=1e-12, rtol=0)
    check_close(gw, torch.zeros_like(gw), atol=1e-12, rtol=0)


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
    check_close(gx, rx)
    check_close(gw, rw)
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
    check_close(linear_divergence(xs, ws, xt, wt, kind="reverse_kl")[0], rkl)
    check_close(linear_divergence(xs, ws, xt, wt, kind="forward_kl")[0], fkl)
    m = 0.5 * (q + p)
    jsd = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
    check_close(linear_divergence(xs, ws, xt, wt, kind="jsd", beta=0.5)[0], jsd)


def test_topk_none_tail_is_partial_sum_and_bucket_is_a_divergence(small_chunks):
    # The raw partial sum can go negative; with the tail bucket the value is a true divergence (>= 0).
    xs, ws, xt, wt = op_inputs(64, 6, 120, scale=1.5)
    ids = teacher_ids(xt, wt, 3, {})
    none = linear_divergence(xs, ws, xt, wt, support="teacher_topk", topk=ids, tail="none")
    bucket = linear_divergence(xs, ws, xt, wt, support="teacher_topk", topk=ids, tail="bucket")
    assert (bucket >= -1e-12).all()
    assert (none < 0).any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_masked_mean_is_zero_not_nan(backend):
    xs, ws, xt, wt = op_inputs(6, 4, 30)
    mask = torch.zeros(6, dtype=torch.bool)
    out = linear_divergence(xs, ws, xt, wt, mask=mask, reduction="mean", backend=backend)
    gx, gw = torch.autograd.grad(out, (xs, ws))
    assert out.item() == 0.0
    assert (gx == 0).all() and (gw == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_rows_may_hold_garbage(backend):
    xs, ws, xt, wt = op_inputs(6, 4, 30)
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
    xs, ws, xt, wt = op_inputs(5, 4, 30)
    with torch.no_grad():
        xs[1, 0] = float("nan")
    out = linear_divergence(xs, ws, xt, wt, backend=backend)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2, 3, 4]]).all()
    assert torch.isnan(linear_divergence(xs, ws, xt, wt, reduction="mean", backend=backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck(backend):
    N, H, V = 4, 3, 11
    xs, ws, xt, wt = op_inputs(N, H, V)
    ids = teacher_ids(xt, wt, 3, {})
    for kw in (dict(kind="reverse_kl", softcap=2.0, temperature=0.8), dict(kind="jsd", beta=0.7),
               dict(kind="forward_kl", support="teacher_topk", topk=ids, tail="bucket"),
               dict(kind="reverse_kl", support="teacher_topk", topk=ids, tail="renorm")):
        def f(a, b, kw=kw):
            return linear_divergence(a, b, xt, wt, backend=backend, **kw)
        assert torch.autograd.gradcheck(f, (xs, ws))
    ids1 = torch.randint(0, V, (N,))
    g = lambda a, b: linear_logprobs(a, b, ids1, return_entropy=True, softcap=3.0, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(g, (xs, ws))


# ----------------------------------------------------------------------------- C++ CPU backend


@CPU
@pytest.mark.isa
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("logit_name", ["plain", "temp_scale_softcap"])
@pytest.mark.parametrize("support,tail", SUPPORTS)
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
@pytest.mark.parametrize("clip", [None, 0.004])
def test_cpu_divergence_matches_dense(kind, support, tail, logit_name, dtype, clip):
    N, H, V = 23, 12, 211
    logit = LOGITS[logit_name]
    xs, ws, xt, wt = cpu_inputs(N, H, V, dtype)
    div = DivergenceSpec(kind=kind, beta=0.3, support=support, tail=tail, term_clip=clip)
    K = random_ids(N, V, 9) if support == "teacher_topk" else None
    tg = torch.randn(N, dtype=torch.float64).to(dtype)
    loss, dx, dw = cpu.divergence(xs, ws, xt, wt, logit, div, K, tg)
    assert loss.dtype == dx.dtype == dw.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert dx.shape == xs.shape and dw.shape == ws.shape
    exact, plain = check_div((loss, dx, dw), xs, ws, xt, wt, logit, div, K, tg)
    want_loss = exact[0]
    if clip is not None:  # the clip must actually bind somewhere, or the test proves nothing
        unclipped = dense.divergence_grads(xs, ws, xt, wt, logit, DivergenceSpec(kind, 0.3, support, tail), K, tg)[0]
        assert (unclipped - want_loss).abs().max() > 1e-6
    # Loss without gradient: the same numbers.
    loss2, none_dx, none_dw = cpu.divergence(xs, ws, xt, wt, logit, div, K, None)
    assert none_dx is None and none_dw is None
    check_accurate([loss2], [exact[0]], [plain[0]], ["loss (no grad)"], dtype)


@CPU
@pytest.mark.isa
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("logit_name", ["plain", "temp_scale_softcap", "temp_scale"])
@pytest.mark.parametrize("kind,tail", [("reverse_kl", "bucket"), ("forward_kl", "renorm"), ("jsd", "none")])
@pytest.mark.parametrize("k", [1, 9, 211])
def test_cpu_divergence_select_matches_dense(kind, tail, logit_name, dtype, k):
    """The teacher-top-k divergence that selects its own support (one teacher lm_head pass, no top-k op): its ids
    are the teacher's top k of the float64 logits (k = V included), and loss and student gradients are those of
    the dense float64 reference on those ids, with per-token upstream gradients, over several row chunks (CPU's
    small workspace)."""
    N, H, V = 23, 12, 211
    logit = LOGITS[logit_name]
    xs, ws, xt, wt = cpu_inputs(N, H, V, dtype)
    div = DivergenceSpec(kind=kind, beta=0.3, support="teacher_topk", tail=tail)
    tg = torch.randn(N, dtype=torch.float64).to(dtype)
    loss, dx, dw, stats, ids = cpu.divergence_select(xs, ws, xt, wt, logit, div, k, tg)
    assert stats is None and ids.shape == (N, k) and ids.dtype == torch.int64
    assert all(len(set(r.tolist())) == k for r in ids)
    z64 = z64_of(xt, wt, logit)
    top = z64.sort(dim=1, descending=True).values
    tol = 1e-12 if dtype == torch.float64 else 1e-5 * z64.abs().max().item()
    assert (z64.gather(1, ids) >= top[:, k - 1:k] - tol).all()  # every id is among the k best (ties allowed)
    assert (z64.gather(1, ids).diff(dim=1) <= tol).all()  # descending, as the top-k op returns them
    check_div((loss, dx, dw), xs, ws, xt, wt, logit, div, ids, tg)
    # Without gradients: the same ids and losses; with token statistics as well.
    loss2, none_dx, none_dw, _, ids2 = cpu.divergence_select(xs, ws, xt, wt, logit, div, k, None)
    assert none_dx is None and none_dw is None and torch.equal(ids2, ids)
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)
    sid = torch.randint(0, V, (N,))
    got = cpu.divergence_select(xs, ws, xt, wt, logit, div, k, tg, sid)
    assert torch.equal(got[4], ids)
    want = cpu.divergence_stats(xs, ws, xt, wt, logit, div, ids, tg, sid)
    for g, w in zip(got[:4], want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@CPU
@pytest.mark.isa
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("logit_name", ["plain", "temp_scale_softcap", "temp_scale"])
def test_cpu_divergence_select_ties_and_nonfinite_ids(dtype, logit_name):
    """Equal teacher logits go to the lowest ids, and a row with fewer than k logits above -inf is completed with its
    -inf ids by id -- the top-k op's order, exactly.  The teacher's logits are exact: a hidden state of ones(1) times
    a one-column lm_head holding the row."""
    inf = float("inf")
    V, N = 37, 3
    xs, ws, _, _ = cpu_inputs(N, 6, V, dtype)
    logit = LOGITS[logit_name]
    for row in ([float(j % 5) for j in range(V)], [(-inf if j % 3 == 0 else float(j % 4)) for j in range(V)],
                [(-inf if j != 20 else 2.0) for j in range(V)]):
        xt, wt = torch.ones(N, 1, dtype=dtype), torch.tensor(row, dtype=dtype)[:, None]
        for k in (1, 5, 13, 30, V):
            ids = cpu.divergence_select(xs, ws, xt, wt, logit, DivergenceSpec(support="teacher_topk"), k, None)[4]
            want = torch.tensor(exact_order(row)[:k]).expand(N, k)
            assert torch.equal(ids, want), (row, k, ids)
            assert torch.equal(ids, cpu.topk(xt, wt, k, logit)[0])


@CPU
def test_int_topk_is_selected_inside_the_cpu_divergence(monkeypatch):
    """``topk=k`` on the C++ backend: the divergence selects the teacher's top k itself, so the top-k op (a second
    pass over the teacher's lm_head) is never called; losses and gradients (masked rows, per-token upstream
    gradients, every reduction) are the dense float64 reference's on the teacher's true top k."""
    calls = []
    real = cpu.topk
    monkeypatch.setattr(cpu, "topk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    N, H, V, k = 31, 10, 157, 6
    xs, ws, xt, wt = op_inputs(N, H, V)
    mask = torch.rand(N) > 0.3
    opts = dict(temperature=0.9, softcap=4.0)
    ids = teacher_ids(xt, wt, k, opts)
    up = torch.randn(N, dtype=F64)
    for reduction in ("none", "mean", "sum"):
        got = linear_divergence(xs, ws, xt, wt, kind="jsd", beta=0.4, support="teacher_topk", topk=k, mask=mask,
                                reduction=reduction, backend="cpu", **opts)
        per = dense.divergence(xs, ws, xt, wt, kind="jsd", beta=0.4, support="teacher_topk", topk_ids=ids,
                               **opts) * mask
        want = per if reduction == "none" else per.sum() / (int(mask.sum()) if reduction == "mean" else 1)
        w = up if reduction == "none" else 1.7
        gx, gw = torch.autograd.grad((got * w).sum(), (xs, ws))
        rx, rw = torch.autograd.grad((want * w).sum(), (xs, ws))
        check_close(got, want)
        check_close(gx, rx)
        check_close(gw, rw)
    assert not calls


@CPU
@pytest.mark.parametrize("support,tail", SUPPORTS)
@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
def test_cpu_divergence_matches_reference_backend(kind, support, tail, small_chunks):
    N, H, V = 19, 10, 150
    logit = LOGITS["temp_scale"]
    xs, ws, xt, wt = cpu_inputs(N, H, V, torch.float64)
    div = DivergenceSpec(kind=kind, beta=0.6, support=support, tail=tail, term_clip=0.05)
    K = reference.topk(xt, wt, 11, logit)[0] if support == "teacher_topk" else None
    tg = torch.rand(N, dtype=torch.float64) - 0.3
    got = cpu.divergence(xs, ws, xt, wt, logit, div, K, tg)
    want = reference.divergence(xs, ws, xt, wt, logit, div, K, tg)
    for g, w, name in zip(got, want, DIV_NAMES):
        close64(g, w, name)


@CPU
@pytest.mark.parametrize("t_dtype", [torch.float32, torch.bfloat16])
def test_cpu_teacher_with_other_hidden_size_and_dtype(t_dtype):
    """The teacher may be a different model: its own hidden size and dtype."""
    N, V = 15, 211
    xs, ws, _, _ = cpu_inputs(N, 12, V, torch.float32)
    _, _, xt, wt = cpu_inputs(N, 20, V, torch.float32)
    xt, wt = xt.to(t_dtype), wt.to(t_dtype)
    K = random_ids(N, V, 5)
    tg = torch.rand(N)
    for support in ("full", "teacher_topk"):
        div = DivergenceSpec(kind="forward_kl", support=support)
        got = cpu.divergence(xs, ws, xt, wt, LOGITS["temp_scale"], div, K, tg)
        check_div(got, xs, ws, xt, wt, LOGITS["temp_scale"], div, K, tg, f"{support} ")


@CPU
def test_cpu_clip_binds_and_changes_result():
    """term_clip must change both loss and gradient when some summand exceeds it."""
    N, H, V = 9, 8, 64
    xs, ws, xt, wt = cpu_inputs(N, H, V, torch.float64, scale=2.0)
    tg = torch.ones(N, dtype=torch.float64)
    plain = cpu.divergence(xs, ws, xt, wt, LogitSpec(), DivergenceSpec(), None, tg)
    clipped = cpu.divergence(xs, ws, xt, wt, LogitSpec(), DivergenceSpec(term_clip=0.01), None, tg)
    assert (clipped[0] < plain[0] - 1e-6).any()
    assert not torch.allclose(clipped[1], plain[1])


@CPU
def test_cpu_reverse_kl_closed_form():
    """KL(q||p) = sum q (log q - log p) written out with softmax, independent of dense.py."""
    N, H, V = 7, 6, 33
    xs, ws, xt, wt = cpu_inputs(N, H, V, torch.float64)
    q = torch.softmax(xs @ ws.T, -1)
    p = torch.softmax(xt @ wt.T, -1)
    want = (q * (q.log() - p.log())).sum(-1)
    got = cpu.divergence(xs, ws, xt, wt, LogitSpec(), DivergenceSpec(), None, None)[0]
    close64(got, want, "KL(q||p)")
    fwd = cpu.divergence(xs, ws, xt, wt, LogitSpec(), DivergenceSpec(kind="forward_kl"), None, None)[0]
    close64(fwd, (p * (p.log() - q.log())).sum(-1), "KL(p||q)")


@CPU
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_cpu_single_token_and_identical_distributions(kind, dtype):
    """N = 1; student == teacher gives loss 0 and gradient 0 on every support."""
    N, H, V = 1, 5, 211
    xs, ws, _, _ = cpu_inputs(N, H, V, dtype, scale=3.0)
    tg = torch.full((N,), 0.7, dtype=dtype)
    for support, tail in SUPPORTS:
        div = DivergenceSpec(kind=kind, support=support, tail=tail)
        K = random_ids(N, V, 4) if support == "teacher_topk" else None
        loss, dx, dw = cpu.divergence(xs, ws, xs, ws, LOGITS["temp_scale_softcap"], div, K, tg)
        # Both sides compute the same logits, so the summands cancel up to the epilogue's own rounding
        # (no BLAS error enters): a few ulp of the O(1) terms.
        atol = 1e-12 if dtype == torch.float64 else 16 * torch.finfo(torch.float32).eps
        assert loss.abs().max() <= atol, (support, tail, loss)
        if tail == "none":  # the raw partial sum is not a divergence: its gradient need not vanish
            continue
        assert dx.abs().max() <= atol and dw.abs().max() <= atol, (support, tail)
    # And a different teacher with N = 1 still matches the dense formula.
    xs, ws, xt, wt = cpu_inputs(N, H, V, dtype)
    div = DivergenceSpec(kind=kind)
    tg = torch.tensor([1.3], dtype=dtype)
    got = cpu.divergence(xs, ws, xt, wt, LogitSpec(), div, None, tg)
    check_div(got, xs, ws, xt, wt, LogitSpec(), div, None, tg)


@CPU
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_cpu_vocab_of_one_and_k_equal_v(kind):
    """V = 1: every distribution is a point mass (loss 0, gradient 0).  k = V: empty tail."""
    xs, ws, xt, wt = cpu_inputs(6, 4, 1, torch.float32)
    tg = torch.ones(6)
    for support, tail in SUPPORTS:
        K = torch.zeros(6, 1, dtype=torch.int64) if support == "teacher_topk" else None
        loss, dx, dw = cpu.divergence(xs, ws, xt, wt, LogitSpec(), DivergenceSpec(kind=kind, support=support,
                                                                                    tail=tail), K, tg)
        assert torch.equal(loss, torch.zeros(6)) and torch.equal(dx, torch.zeros_like(dx))
        assert torch.equal(dw, torch.zeros_like(dw))
    xs, ws, xt, wt = cpu_inputs(5, 4, 12, torch.float64)
    K = random_ids(5, 12, 12)
    tg = torch.rand(5, dtype=torch.float64)
    for tail in ("bucket", "renorm", "none"):
        div = DivergenceSpec(kind=kind, support="teacher_topk", tail=tail)
        got = cpu.divergence(xs, ws, xt, wt, LogitSpec(), div, K, tg)
        full = cpu.divergence(xs, ws, xt, wt, LogitSpec(), DivergenceSpec(kind=kind), None, tg)
        for g, w, name in zip(got, full, DIV_NAMES):  # k = V is the full divergence
            close64(g, w, f"{tail} {name}")


@CPU
@pytest.mark.isa
@pytest.mark.parametrize("support,tail", SUPPORTS)
def test_cpu_extreme_logits(support, tail):
    """Logits of +-1e4 scale: finite, as accurate as plain fp32 PyTorch, no NaN from exp underflow."""
    N, H, V = 11, 8, 211
    xs, ws, xt, wt = cpu_inputs(N, H, V, torch.float64, scale=2.0e3, teacher_scale=1.5e3)
    assert (xs @ ws.T).abs().max() > 5e3
    K = random_ids(N, V, 6, seed=3) if support == "teacher_topk" else None
    tg = torch.rand(N, dtype=torch.float64)
    for kind in ("reverse_kl", "forward_kl", "jsd"):
        div = DivergenceSpec(kind=kind, support=support, tail=tail)
        for dtype in (torch.float64, torch.float32):
            args = [t.to(dtype) for t in (xs, ws, xt, wt)]
            got = cpu.divergence(*args, LogitSpec(), div, K, tg.to(dtype))
            for g, name in zip(got, DIV_NAMES):
                assert torch.isfinite(g).all(), (kind, dtype, name)
            # float64 truth of the rounded inputs (fp32 logits of 1e4 carry ~1e-3 error, plain PyTorch too)
            check_div(got, *args, LogitSpec(), div, K, tg.to(dtype), f"{kind} {dtype} ")


@CPU
def test_cpu_nonfinite_input_is_reported_not_hidden():
    xs, ws, xt, wt = cpu_inputs(4, 6, 50, torch.float32)
    xs[2, 1] = float("nan")
    loss = cpu.divergence(xs, ws, xt, wt, LogitSpec(), DivergenceSpec(), None, None)[0]
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3]]).all()
    lp, ent, lse = cpu.logprobs_forward(xs, ws, torch.zeros(4, dtype=torch.int64), LogitSpec())
    assert torch.isnan(lse[2]) and torch.isnan(lp[2])


@CPU
def test_cpu_missing_topk_ids_is_a_value_error():
    xs, ws, xt, wt = cpu_inputs(3, 4, 10, torch.float32)
    with pytest.raises(ValueError, match="topk_ids"):
        cpu.divergence(xs, ws, xt, wt, LogitSpec(), DivergenceSpec(support="teacher_topk"), None, None)


@CPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_cpu_low_precision_divergence(dtype, kind):
    N, H, V = 24, 16, 211
    xs, ws, xt, wt = cpu_inputs(N, H, V, dtype)
    div = DivergenceSpec(kind=kind, beta=0.4)
    tg = torch.rand(N)
    loss, dx, dw = cpu.divergence(xs, ws, xt, wt, LOGITS["temp_scale"], div, None, tg)
    assert loss.dtype == dx.dtype == dw.dtype == torch.float32
    want = dense.divergence_grads(xs, ws, xt, wt, LOGITS["temp_scale"], div, None, tg)
    a, b = xs.clone().requires_grad_(), ws.clone().requires_grad_()
    plain = dense.divergence(a, b, xt, wt, kind=kind, beta=0.4, temperature=1.8, logit_scale=0.6)
    (plain * tg.to(dtype)).sum().backward()
    fa_check(loss, want[0], plain.detach(), "loss")
    fa_check(dx, want[1], a.grad, "d_hidden")
    fa_check(dw, want[2], b.grad, "d_weight")


@CPU
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cpu_public_divergence_op_on_cpu_backend(reduction):
    ops = pytest.importorskip("copsd.ops")
    N, H, V = 26, 12, 211
    xs, ws, xt, wt = cpu_inputs(N, H, V, torch.float32)
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
    check_accurate(outs["cpu"], outs["exact"], outs["plain"], DIV_NAMES, torch.float32)
    if reduction == "none":
        assert torch.equal(outs["cpu"][0][~mask], torch.zeros(int((~mask).sum())))
        assert torch.equal(outs["cpu"][1][~mask], torch.zeros_like(outs["cpu"][1][~mask]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_backward_fills_no_zero_gradients(backend, reduction):
    """The backward of a reduced loss (which only scales the gradients the forward computed) gets no zero-filled
    upstream gradients for the outputs nothing differentiates (the saved d_hidden / d_weight, the statistics): a
    [V, H] fill per step otherwise.  The gradients stay right."""
    N, H, V = 7, 5, 13
    xs, ws, xt, wt = op_inputs(N, H, V)
    ids = torch.arange(N) % V
    loss, _ = linear_divergence(xs, ws, xt, wt, kind="jsd", beta=0.3, stats_ids=ids, reduction=reduction,
                                backend=backend)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        got = torch.autograd.grad(loss.sum(), (xs, ws))
    # (the root gradient, a scalar 1, is the one fill expected)
    fills = [(e.name, e.input_shapes) for e in prof.events()
             if e.name in ("aten::zeros", "aten::zero_", "aten::fill_") and e.input_shapes and e.input_shapes[0]]
    assert not fills, fills
    want = torch.autograd.grad(linear_divergence(xs, ws, xt, wt, kind="jsd", beta=0.3, reduction=reduction,
                                                 backend="reference"), (xs, ws))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- token statistics (stats_ids)


def _stats_want(xs, ws, xt, wt, ids, mask, opts, dtype=F64):
    """(student log-prob, student entropy, teacher log-prob) of ``ids`` from the dense definitions, 0 where
    masked (masked ids may be garbage: clamped before the gather)."""
    a = [t.detach().to(dtype) for t in (xs, ws, xt, wt)]
    safe = ids.clamp(0, ws.shape[0] - 1)
    s_lp, s_ent, _ = dense.logprobs(a[0], a[1], safe, **opts)
    t_lp = dense.logprobs(a[2], a[3], safe, **opts)[0]
    keep = torch.ones(len(ids), dtype=torch.bool) if mask is None else mask
    return [torch.where(keep, t, torch.zeros_like(t)) for t in (s_lp, s_ent, t_lp)]


STAT_NAMES = ("student_logprobs", "student_entropy", "teacher_logprobs")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("kind,support,tail,opts", [
    ("jsd", "full", None, LOGIT_OPTS[1]), ("reverse_kl", "full", None, LOGIT_OPTS[0]),
    ("forward_kl", "full", None, LOGIT_OPTS[2]), ("forward_kl", "teacher_topk", "bucket", LOGIT_OPTS[1]),
    ("jsd", "teacher_topk", "renorm", LOGIT_OPTS[2])], ids=["jsd", "rkl", "fkl-softcap", "topk-bucket",
                                                            "topk-renorm-softcap"])
def test_divergence_stats(backend, reduction, kind, support, tail, opts, small_chunks):
    """stats_ids: the token statistics match the dense definitions (0 on masked tokens, whose ids are never read),
    and the loss and its gradients are those of the call without stats_ids."""
    N, H, V, k = 31, 10, 157, 6
    xs, ws, xt, wt = op_inputs(N, H, V, scale=1.5)
    extra = dict(support=support, tail=tail, topk=k) if support == "teacher_topk" else {}
    mask = torch.rand(N) > 0.3
    ids = torch.randint(0, V, (N,))
    ids[~mask] = -100  # e.g. an ignore label: masked tokens' ids are not read
    kw = dict(kind=kind, beta=0.3, mask=mask, reduction=reduction, backend=backend, **opts, **extra)
    up = torch.randn(N, dtype=F64) if reduction == "none" else torch.tensor(1.3, dtype=F64)
    got, stats = linear_divergence(xs, ws, xt, wt, stats_ids=ids, **kw)
    assert type(stats).__name__ == "DivergenceStats" and stats._fields == STAT_NAMES
    for t in stats:
        assert t.shape == (N,) and t.dtype == F64 and not t.requires_grad
    gx, gw = torch.autograd.grad((got * up).sum(), (xs, ws))
    plain = linear_divergence(xs, ws, xt, wt, **kw)
    rx, rw = torch.autograd.grad((plain * up).sum(), (xs, ws))
    check_close(got, plain, rtol=1e-12, atol=1e-12)
    check_close(gx, rx, rtol=1e-12, atol=1e-12)
    check_close(gw, rw, rtol=1e-12, atol=1e-12)
    for g, w, name in zip(stats, _stats_want(xs, ws, xt, wt, ids, mask, opts), STAT_NAMES):
        close64(g, w, name)
        assert (g[~mask] == 0).all(), name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_divergence_stats_unfused_path_matches(backend, monkeypatch):
    """A backend without a fused ``divergence_stats`` (Triton, CUDA) gets the statistics from its log-probs
    kernel in the op layer: the same numbers."""
    N, H, V = 17, 8, 90
    xs, ws, xt, wt = op_inputs(N, H, V, Ht=5)
    mask = torch.rand(N) > 0.2
    ids = torch.randint(0, V, (N,))
    fused = linear_divergence(xs, ws, xt, wt, kind="jsd", mask=mask, stats_ids=ids, backend=backend,
                              temperature=0.8)[1]
    from copsd import backends

    calls = []
    real = backends.Kernel.other

    def no_fused(self, op):
        calls.append(op)
        return None if op == "divergence_stats" else real(self, op)

    monkeypatch.setattr(backends.Kernel, "other", no_fused)
    unfused = linear_divergence(xs, ws, xt, wt, kind="jsd", mask=mask, stats_ids=ids, backend=backend,
                                temperature=0.8)[1]
    assert "divergence_stats" in calls
    for a, b, name in zip(fused, unfused, STAT_NAMES):
        close64(a, b, name)
    for g, w, name in zip(unfused, _stats_want(xs, ws, xt, wt, ids, mask, dict(temperature=0.8)), STAT_NAMES):
        close64(g, w, name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_divergence_stats_bad_ids(backend):
    xs, ws, xt, wt = op_inputs(5, 4, 20)
    with pytest.raises(ValueError, match="stats_ids"):
        linear_divergence(xs, ws, xt, wt, stats_ids=torch.zeros(4, dtype=torch.int64), backend=backend)
    with pytest.raises(ValueError, match="stats_ids"):
        linear_divergence(xs, ws, xt, wt, stats_ids=torch.zeros(5), backend=backend)
    with pytest.raises(ValueError, match="stats_ids"):
        linear_divergence(xs, ws, xt, wt, stats_ids=torch.full((5,), 20), backend=backend)
    mask = torch.tensor([True, True, False, True, True])
    ids = torch.tensor([1, 2, 20, 3, 4])  # out of range only where masked: fine
    linear_divergence(xs, ws, xt, wt, mask=mask, stats_ids=ids, backend=backend)
    with pytest.raises(ValueError, match="stats_ids"):
        linear_divergence(xs, ws, xt, wt, mask=mask, stats_ids=torch.tensor([1, 2, 3, -1, 4]), backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_divergence_stats_compile(backend, reduction):
    """torch.compile(fullgraph=True) over a call with stats_ids gives eager's loss, gradients and statistics."""
    torch._dynamo.reset()
    N, H, V = 9, 6, 13
    xs, ws, xt, wt = op_inputs(N, H, V)
    mask = torch.tensor([True, False, True, True, True, False, True, True, True])
    ids = torch.arange(N) % V

    def f(xs, ws, xt, wt, mask, ids):
        loss, st = linear_divergence(xs, ws, xt, wt, kind="jsd", beta=0.3, mask=mask, stats_ids=ids,
                                     reduction=reduction, backend=backend)
        return loss.sum(), st.student_logprobs, st.student_entropy, st.teacher_logprobs

    outs = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        loss, *st = fn(xs, ws, xt, wt, mask, ids)
        outs.append((loss.detach(), *st, *torch.autograd.grad(loss, (xs, ws))))
    torch._dynamo.reset()
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for g, w, name in zip(outs[1][1:4], _stats_want(xs, ws, xt, wt, ids, mask, {}), STAT_NAMES):
        close64(g, w, name)


@CPU
@pytest.mark.isa
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind,case", [
    ("reverse_kl", "plain"), ("reverse_kl", "softcap"), ("reverse_kl", "extreme"), ("forward_kl", "temp_scale"),
    ("forward_kl", "topk"), ("forward_kl", "extreme"), ("jsd", "temp_scale"), ("jsd", "clip"), ("jsd", "extreme"),
    ("jsd", "topk")])
def test_cpu_divergence_stats_kernel(kind, case, dtype):
    """The C++ epilogue's token statistics (every row path: the online full-support kernels with and without the
    linear transform, softcap / clip, teacher top-k; logits of order 1e4) against float64, float32 by the
    error-relative criterion; loss and gradients are those of ``divergence`` (up to the rounding of the
    vectorised sums, which the compiler may order differently with one more accumulator: a few ulps)."""
    N, H, V = 13, 12, 1237  # several vocabulary blocks, a partial last one
    scale = 2.0e3 if case == "extreme" else 1.0
    xs, ws, xt, wt = cpu_inputs(N, H, V, dtype, scale=scale, teacher_scale=0.75 * scale if scale > 1 else None)
    logit = {"temp_scale": LOGITS["temp_scale"], "softcap": LOGITS["temp_scale_softcap"]}.get(case, LogitSpec())
    div = DivergenceSpec(kind=kind, beta=0.3, term_clip=0.004 if case == "clip" else None,
                         support="teacher_topk" if case == "topk" else "full")
    K = random_ids(N, V, 7) if case == "topk" else None
    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(5))
    ids[3] = int((xs[3].double() @ ws.double().T).argmax())  # the student's top token
    for tg in (None, torch.randn(N, dtype=torch.float64).to(dtype)):
        *got, stats = cpu.divergence_stats(xs, ws, xt, wt, logit, div, K, tg, ids)
        want = cpu.divergence(xs, ws, xt, wt, logit, div, K, tg)
        for g, w, name in zip(got, want, DIV_NAMES):
            assert (g is None) == (w is None), name
            if g is not None:
                bound = 8 * torch.finfo(dtype).eps * max(1.0, w.abs().max().item())
                assert (g - w).abs().max().item() <= bound, name
    assert stats.shape == (3, N) and stats.dtype == want[0].dtype
    opts = spec_kwargs(logit)

    def dense_stats(dt):
        return [*dense.logprobs(xs.to(dt), ws.to(dt), ids, **opts)[:2], dense.logprobs(xt.to(dt), wt.to(dt), ids,
                                                                                       **opts)[0]]

    exact = dense_stats(torch.float64)
    plain = exact if dtype == torch.float64 else dense_stats(torch.float32)
    check_accurate(list(stats), exact, plain, STAT_NAMES, dtype)


# ----------------------------------------------------------------------------- Triton backend


@TRITON
@pytest.mark.parametrize("kind,clip,spec", [
    ("reverse_kl", None, "all"),
    ("forward_kl", None, "plain"),
    ("jsd", None, "all"),
    ("reverse_kl", 0.02, "plain"),
    ("forward_kl", 0.02, "all"),
    ("jsd", 0.01, "plain"),
])
def test_triton_divergence_full(triton_slices, kind, clip, spec):
    N, H, V = 13, 40, 53
    spec = SPECS[spec]
    xs, ws = rand_lm(N, H, V, scale=2.0)
    xt, wt = rand_lm(N, 24, V, scale=2.0)  # the teacher may have another hidden size
    div = DivergenceSpec(kind=kind, beta=0.3, term_clip=clip)
    tg = torch.randn(N, device=DEV)
    loss, dx, dw = tri.divergence(xs, ws, xt, wt, spec, div, None, tg)
    e_loss, e_dx, e_dw = dense.divergence_grads(xs, ws, xt, wt, spec, div, None, tg)
    close(loss, e_loss, 2e-5)
    close(dx, e_dx, 2e-5)
    close(dw, e_dw, 2e-5)
    loss_only, none_dx, none_dw = tri.divergence(xs, ws, xt, wt, spec, div, None, None)
    assert none_dx is None and none_dw is None
    close(loss_only, loss, 1e-6)


@TRITON
@pytest.mark.parametrize("kind,tail,clip,k", [
    ("reverse_kl", "bucket", None, 6),
    ("forward_kl", "renorm", None, 6),
    ("jsd", "none", None, 6),
    ("jsd", "bucket", 0.01, 4),
    ("reverse_kl", "bucket", None, 29),  # k == V: empty tail
])
def test_triton_divergence_teacher_topk(triton_slices, kind, tail, clip, k):
    N, H, V = 11, 24, 29
    spec = SPECS["all"]
    xs, ws = rand_lm(N, H, V, scale=2.0)
    xt, wt = rand_lm(N, 16, V, scale=2.0)  # the teacher may have another hidden size
    K = torch.stack([torch.randperm(V)[:k] for _ in range(N)]).to(DEV)
    div = DivergenceSpec(kind=kind, beta=0.4, support="teacher_topk", tail=tail, term_clip=clip)
    tg = torch.randn(N, device=DEV)
    loss, dx, dw = tri.divergence(xs, ws, xt, wt, spec, div, K, tg)
    e_loss, e_dx, e_dw = dense.divergence_grads(xs, ws, xt, wt, spec, div, K, tg)
    close(loss, e_loss, 2e-5)
    close(dx, e_dx, 2e-5)
    close(dw, e_dw, 2e-5)
    r_loss, r_dx, r_dw = ref.divergence(xs, ws, xt, wt, spec, div, K, tg)
    close(loss, r_loss, 2e-5)
    close(dw, r_dw, 2e-5)


@TRITON
@pytest.mark.parametrize("support", ["full", "teacher_topk"])
def test_triton_divergence_identical_is_zero(support):
    N, H, V = 7, 16, 33
    x, w = rand_lm(N, H, V, scale=3.0)
    K = x.new_zeros(N, 5, dtype=torch.int64) + torch.arange(5, device=DEV) if support != "full" else None
    tg = torch.randn(N, device=DEV)
    for kind in ("reverse_kl", "forward_kl"):
        div = DivergenceSpec(kind=kind, support=support)
        loss, dx, dw = tri.divergence(x, w, x.clone(), w.clone(), LogitSpec(), div, K, tg)
        # full support cancels exactly (same tiles, same LSEs); the top-k path sums a dense
        # kernel part and a sparse torch part, so only to float32 rounding
        tol = 1e-6 if support == "full" else 1e-5
        assert loss.abs().max().item() <= 1e-6
        assert dx.abs().max().item() <= tol and dw.abs().max().item() <= tol


@TRITON
def test_triton_divergence_extreme_one_hot_teacher(triton_slices):
    # teacher logits of 1e4 scale (one-hot-like p), student moderate.  fp32 logits of that size
    # carry ~1e-3 absolute rounding, so the criterion is the FlashAttention one against the fp32
    # reference backend: error <= 2x the reference's error vs float64 (plus a small floor).
    N, H, V = 6, 16, 37
    xs, ws = rand_lm(N, H, V, scale=2.0)
    xt, wt = rand_lm(N, H, V, scale=2e4)
    tg = torch.randn(N, device=DEV)
    for div, K in ((DivergenceSpec(kind="forward_kl"), None),
                   (DivergenceSpec(kind="jsd", beta=0.5), None),
                   (DivergenceSpec(kind="reverse_kl", support="teacher_topk"),
                    torch.stack([torch.randperm(V)[:3] for _ in range(N)]).to(DEV))):
        got = tri.divergence(xs, ws, xt, wt, LogitSpec(), div, K, tg)
        fp32 = ref.divergence(xs, ws, xt, wt, LogitSpec(), div, K, tg)
        exact = dense.divergence_grads(xs, ws, xt, wt, LogitSpec(), div, K, tg)
        for a, r, e in zip(got, fp32, exact):
            assert torch.isfinite(a).all()
            k_err = (a.double().cpu() - e).abs().max().item()
            r_err = (r.double().cpu() - e).abs().max().item()
            assert k_err <= 2 * r_err + 1e-5 * (1 + e.abs().max().item()), (div.kind, k_err, r_err)


@TRITON
@pytest.mark.parametrize("N,V,kind,clip,spec", [
    (1, 67, "reverse_kl", None, "all"),  # one token; odd V over several row blocks / tiles
    (5, 1, "jsd", None, "plain"),  # one vocabulary entry: zero divergence and gradient
    (6, 67, "jsd", 0.005, "all"),
    (6, 67, "forward_kl", 0.01, "plain"),
])
def test_triton_divergence_shapes_vs_reference(triton_slices, N, V, kind, clip, spec):
    spec = SPECS[spec]
    xs, ws = rand_lm(N, 20, V, scale=3.0)
    xt, wt = rand_lm(N, 12, V, scale=3.0)
    div = DivergenceSpec(kind=kind, beta=0.7, term_clip=clip)
    tg = torch.randn(N, device=DEV)
    got = tri.divergence(xs, ws, xt, wt, spec, div, None, tg)
    exact = dense.divergence_grads(xs, ws, xt, wt, spec, div, None, tg)
    refr = ref.divergence(xs, ws, xt, wt, spec, div, None, tg)
    for a, e, r in zip(got, exact, refr):
        close(a, e, 2e-5)
        close(a, r, 2e-5)


@TRITON
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_public_op_reductions_match_reference(triton_slices, reduction):
    # through the autograd op: "mean" takes the gradient-in-forward route, "none" the real backward
    # with a per-token upstream gradient; a masked token gets exactly zero gradient.
    from copsd.ops import linear_divergence

    N, H, V = 9, 16, 41
    xs, ws = rand_lm(N, H, V, scale=3.0)
    xt, wt = rand_lm(N, H, V, scale=3.0)
    mask = torch.ones(N, dtype=torch.bool, device=DEV)
    mask[3] = False
    up = torch.randn(N, device=DEV)
    out = {}
    for backend in ("triton", "reference"):
        a = xs.clone().requires_grad_()
        w = ws.clone().requires_grad_()
        loss = linear_divergence(a, w, xt, wt, kind="jsd", beta=0.4, temperature=1.3, softcap=5.0, mask=mask,
                                 reduction=reduction, backend=backend)
        (loss if reduction == "mean" else loss * up).sum().backward()
        out[backend] = (loss.detach(), a.grad, w.grad)
    for got, want in zip(out["triton"], out["reference"]):
        close(got, want, 2e-5)
    assert (out["triton"][1][3] == 0).all()


@TRITON
@pytest.mark.slow  # the interpreter runs the divergence and two log-probs kernels: ~1 min on a 2-core machine
def test_triton_divergence_stats_unfused(triton_slices):
    """stats_ids on the Triton backend (no fused statistics): the op takes them from Triton's log-probs kernel,
    the same numbers as the reference backend's fused ones."""
    N, H, V = 9, 16, 41
    xs, ws = rand_lm(N, H, V, scale=3.0)
    xt, wt = rand_lm(N, H, V, scale=3.0)
    mask = torch.ones(N, dtype=torch.bool, device=DEV)
    mask[3] = False
    ids = torch.randint(0, V, (N,), device=DEV)
    ids[3] = -1  # masked: never read
    out = {b: linear_divergence(xs, ws, xt, wt, kind="jsd", temperature=1.3, mask=mask, reduction="sum",
                                stats_ids=ids, backend=b) for b in ("triton", "reference")}
    close(out["triton"][0], out["reference"][0], 2e-5)
    for got, want in zip(out["triton"][1], out["reference"][1]):
        close(got, want, 2e-5)
        assert got[3] == 0


@TRITON
def test_triton_empty_token_set():
    x, w = rand_lm(0, 16, 20)
    loss, dx, dw = tri.divergence(x, w, x, w, LogitSpec(), DivergenceSpec(), None, torch.zeros(0, device=DEV))
    assert loss.shape == (0,) and dx.shape == (0, 16) and (dw == 0).all()


# ----------------------------------------------------------------------------- Triton backend on a GPU
# Few kernel variants on purpose (each compiles for ~15-30 s; the GPU benchmark reuses the bf16 plain-logit ones
# from the Triton cache); the interpreter tests above cover every option.


@TRITON
@pytest.mark.gpu
def test_triton_gpu_fp32_odd_shapes_all_options():
    N, H, V = 300, 256, 5003
    xs, ws = rand_lm(N, H, V, scale=4.0)
    xt, wt = rand_lm(N, H, V, scale=4.0)
    spec, div = SPECS["all"], DivergenceSpec(kind="jsd", beta=0.3, term_clip=0.05)
    tg = torch.randn(N, device=DEV)
    loss, dx, dw = tri.divergence(xs, ws, xt, wt, spec, div, None, tg)
    e_loss, e_dx, e_dw = dense.divergence_grads(xs, ws, xt, wt, spec, div, None, tg)
    close(loss, e_loss, 1e-4)
    close(dx, e_dx, 1e-4)
    close(dw, e_dw, 1e-4)


@TRITON
@pytest.mark.gpu
def test_triton_gpu_bf16_flash_criterion(monkeypatch):
    N, H, V = 256, 512, 8000
    from copsd.backends import _triton_common as tc  # imports triton: only where the test runs

    monkeypatch.setattr(tc, "CHUNK_BYTES", 100 * V * 10)  # chunked path: 3 token chunks (dW accumulated)
    xs, ws = rand_lm(N, H, V, scale=4.0, dtype=torch.bfloat16)
    xt, wt = rand_lm(N, H, V, scale=4.0, dtype=torch.bfloat16)
    tg = torch.randn(N, device=DEV)
    div = DivergenceSpec(kind="reverse_kl")
    loss, dx, dw = tri.divergence(xs, ws, xt, wt, LogitSpec(), div, None, tg)
    e_loss, e_dx, e_dw = dense.divergence_grads(xs, ws, xt, wt, LogitSpec(), div, None, tg)
    # plain PyTorch in bf16: bf16 logits, bf16 autograd
    xl = xs.detach().clone().requires_grad_()
    wl = ws.detach().clone().requires_grad_()
    t_loss = dense.divergence(xl, wl, xt, wt)
    t_loss.backward(tg.to(torch.bfloat16))
    bf16_criterion(loss, e_loss, t_loss.detach())
    bf16_criterion(dx, e_dx, xl.grad)
    bf16_criterion(dw, e_dw, wl.grad)
    ids = torch.randint(0, V, (N,), device=DEV)
    lp, ent, lse = tri.logprobs_forward(xs, ws, ids, LogitSpec())
    g = (torch.randn(N, device=DEV), torch.randn(N, device=DEV), None)
    (elp, eent, _), e_dx, e_dw = dense.logprobs_grads(xs, ws, ids, LogitSpec(), g)
    xl = xs.detach().clone().requires_grad_()
    wl = ws.detach().clone().requires_grad_()
    tlp, tent, _ = dense.logprobs(xl, wl, ids)
    (tlp * g[0].bfloat16() + tent * g[1].bfloat16()).sum().backward()
    bf16_criterion(lp, elp, tlp.detach())
    bf16_criterion(ent, eent, tent.detach())
    dx, dw = tri.logprobs_backward(xs, ws, ids, lse, ent, *g, LogitSpec())
    bf16_criterion(dx, e_dx, xl.grad)
    bf16_criterion(dw, e_dw, wl.grad)


@TRITON
@pytest.mark.gpu
def test_triton_gpu_full_vocab_151936():
    N, H, V = 64, 128, 151936
    xs, ws = rand_lm(N, H, V, scale=4.0, dtype=torch.bfloat16)
    xt, wt = rand_lm(N, H, V, scale=4.0, dtype=torch.bfloat16)
    ids = torch.randint(0, V, (N,), device=DEV)
    spec = LogitSpec()
    lp, ent, lse = tri.logprobs_forward(xs, ws, ids, spec)
    rlp, rent, rlse = ref.logprobs_forward(xs.float(), ws.float(), ids, spec)
    close(lse, rlse, 1e-4)
    close(lp, rlp, 1e-4)
    close(ent, rent, 1e-4)
    tg = torch.randn(N, device=DEV)
    div = DivergenceSpec(kind="reverse_kl")
    loss, dx, dw = tri.divergence(xs, ws, xt, wt, spec, div, None, tg)
    r_loss, r_dx, r_dw = ref.divergence(xs.float(), ws.float(), xt.float(), wt.float(), spec, div, None, tg)
    close(loss, r_loss, 1e-3)
    close(dx, r_dx, 2e-2)
    close(dw, r_dw, 2e-2)
    tids, tlp, tlse = tri.topk(xs, ws, 64, spec)
    check_topk(tids, tlp, tlse, z64_of(xs.float(), ws.float(), spec), 64, tol=1e-5)
