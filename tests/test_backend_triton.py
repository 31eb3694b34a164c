"""Triton backend of the fused lm_head ops against the dense float64 formulas (tests/dense.py,
through autograd for gradients) and the chunked reference backend.

Every test runs on both GPU paths of the backend (``COPSD_TRITON_PATH`` = ``fused``: tile-fused
GEMM + epilogue kernels; ``chunked``: cuBLAS logits per token chunk + one Triton row kernel).

Without a GPU the kernels run in the Triton interpreter on CPU tensors at small shapes (odd
sizes, several hidden steps, several vocabulary tiles and gradient slices).  With a GPU the
``gpu``-marked tests run the compiled kernels at larger shapes, bf16 by the FlashAttention
criterion, V = 151936, and the CUDA ``topk_merge`` op.
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # The kernels must be decorated in interpreter mode: set before they are imported, and
    # re-import them if an earlier test module imported them compiled.
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("copsd_kernels._common", "copsd_kernels.linear_logprobs",
                  "copsd_kernels.linear_divergence", "copsd_kernels.linear_topk",
                  "copsd_kernels.linear_rows", "copsd.backends._triton_common", "copsd.backends._triton_logprobs",
                  "copsd.backends._triton_topk", "copsd.backends._triton_divergence"):
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])

import dense  # noqa: E402

from copsd.backends import _cuda_topk  # noqa: E402
from copsd.backends import _triton_common as tc  # noqa: E402
from copsd.backends import reference as ref  # noqa: E402
from copsd.backends import triton as tri  # noqa: E402
from copsd.ops._spec import DivergenceSpec, LogitSpec  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SPECS = {
    "plain": LogitSpec(),
    "all": LogitSpec(temperature=1.7, logit_scale=0.8, softcap=4.0),
}


def path_independent(fn):
    fn.path_independent = True
    return fn


@pytest.fixture(autouse=True, params=["fused", "chunked"])
def path(request, monkeypatch):
    """Run every test on both GPU paths of the backend (once for tests that do not use them)."""
    if getattr(request.function, "path_independent", False) and request.param == "fused":
        pytest.skip("does not depend on the path")
    monkeypatch.setenv("COPSD_TRITON_PATH", request.param)
    return request.param


@pytest.fixture
def slices(monkeypatch):
    """Tiny gradient workspaces: several vocabulary slices per backward (exercises dX accumulation)
    on the fused path, one token per chunk on the chunked path (exercises the dW accumulation)."""
    monkeypatch.setattr(tc, "WORKSPACE_BYTES", 1)
    monkeypatch.setattr(tc, "GATHER_ELEMS", 64)
    monkeypatch.setattr(tc, "CHUNK_BYTES", 1)


def rand_lm(N, H, V, scale=1.0, dtype=torch.float32, device=DEV):
    x = torch.randn(N, H, dtype=torch.float64)
    w = torch.randn(V, H, dtype=torch.float64) * (scale / H**0.5)
    return x.to(device, dtype), w.to(device, dtype)


def spec_kwargs(spec):
    return dict(temperature=spec.temperature, logit_scale=spec.logit_scale, softcap=spec.softcap)


def close(actual, expected, tol):
    """Max abs error relative to the scale of the expected tensor."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert torch.isfinite(actual).all()
    err = (actual - expected).abs().max().item()
    assert err <= tol * (1.0 + expected.abs().max().item()), f"max err {err}"


dense_logprobs_grads = dense.logprobs_grads  # float64 values and gradients, shared with the CPU tests
dense_div_grads = dense.divergence_grads


# ----------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("N,H,V,spec,which", [
    (19, 40, 53, "plain", (1, 1, 1)),
    (19, 40, 53, "all", (1, 0, 1)),
    (1, 24, 1, "all", (1, 1, 0)),  # one token, one vocabulary entry
])
def test_logprobs_forward_backward(slices, N, H, V, spec, which):
    spec = SPECS[spec]
    x, w = rand_lm(N, H, V, scale=3.0)
    ids = torch.randint(0, V, (N,), device=DEV)
    out = tri.logprobs_forward(x, w, ids, spec)
    g = [torch.randn(N, device=DEV) if on else None for on in which]
    (lp, ent, lse), dx_d, dw_d = dense_logprobs_grads(x, w, ids, spec, g)
    for a, e in zip(out, (lp, ent, lse)):
        close(a, e, 2e-5)
    dx, dw = tri.logprobs_backward(x, w, ids, out[2], out[1], *g, spec)
    assert dw.dtype == torch.float32
    close(dx, dx_d, 2e-5)
    close(dw, dw_d, 2e-5)
    rdx, rdw = ref.logprobs_backward(x, w, ids, out[2], out[1], *g, spec)
    close(dx, rdx, 2e-5)
    close(dw, rdw, 2e-5)


def test_logprobs_extreme_logits():
    # logits of +-1e4 scale: no overflow, entropy ~0, log-prob 0 at the argmax
    N, H, V = 9, 16, 37
    x, w = rand_lm(N, H, V)
    spec = LogitSpec(logit_scale=4e3)
    ids = torch.randint(0, V, (N,), device=DEV)
    lp, ent, lse = tri.logprobs_forward(x, w, ids, spec)
    elp, eent, else_ = dense.logprobs(x.double().cpu(), w.double().cpu(), ids.cpu(), logit_scale=4e3)
    close(lse, else_, 1e-6)
    close(lp, elp, 1e-6)
    close(ent, eent, 1e-4)
    g = torch.randn(N, device=DEV)
    dx, dw = tri.logprobs_backward(x, w, ids, lse, ent, g, g, None, spec)
    _, dx_d, dw_d = dense_logprobs_grads(x, w, ids, spec, (g, g, None))
    close(dx, dx_d, 1e-4)
    close(dw, dw_d, 1e-4)


# ----------------------------------------------------------------------------- top-k


def check_topk(ids, lp, lse, x, w, k, spec):
    z = dense.logits(x.double().cpu(), w.double().cpu(), **spec_kwargs(spec))
    L = z.logsumexp(-1)
    close(lse, L, 1e-5)
    ls = z - L[:, None]
    ids, lp = ids.cpu(), lp.double().cpu()
    assert ids.shape == (x.shape[0], k) and ids.dtype == torch.int64
    # descending, distinct, the values are the log-probs of the returned ids
    assert (lp[:, 1:] <= lp[:, :-1] + 1e-6).all()
    assert all(len(set(r.tolist())) == k for r in ids)
    close(lp, ls.gather(1, ids), 1e-5)
    # a true top-k: every returned value >= the k-th best (ties allowed within tolerance)
    kth = ls.topk(k, dim=1).values[:, -1:]
    assert (ls.gather(1, ids) >= kth - 1e-5).all()


@pytest.mark.parametrize("N,H,V,k,spec", [
    (9, 40, 101, 5, "all"),
    (3, 16, 45, 16, "plain"),
    (2, 16, 7, 7, "plain"),  # k == V
    (1, 16, 1, 1, "plain"),
])
def test_topk(N, H, V, k, spec):
    spec = SPECS[spec]
    x, w = rand_lm(N, H, V, scale=3.0)
    ids, lp, lse = tri.topk(x, w, k, spec)
    check_topk(ids, lp, lse, x, w, k, spec)


def test_topk_ties():
    # duplicated weight rows give exactly tied logits; any tied choice is a valid top-k
    N, H, V, k = 5, 16, 40, 6
    x, w = rand_lm(N, H, V)
    w[20:] = w[:20]
    ids, lp, lse = tri.topk(x, w, k, LogitSpec())
    check_topk(ids, lp, lse, x, w, k, LogitSpec())


# ----------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("kind,clip,spec", [
    ("reverse_kl", None, "all"),
    ("forward_kl", None, "plain"),
    ("jsd", None, "all"),
    ("reverse_kl", 0.02, "plain"),
    ("forward_kl", 0.02, "all"),
    ("jsd", 0.01, "plain"),
])
def test_divergence_full(slices, kind, clip, spec):
    N, H, V = 13, 40, 53
    spec = SPECS[spec]
    xs, ws = rand_lm(N, H, V, scale=2.0)
    xt, wt = rand_lm(N, 24, V, scale=2.0)  # the teacher may have another hidden size
    div = DivergenceSpec(kind=kind, beta=0.3, term_clip=clip)
    tg = torch.randn(N, device=DEV)
    loss, dx, dw = tri.divergence(xs, ws, xt, wt, spec, div, None, tg)
    e_loss, e_dx, e_dw = dense_div_grads(xs, ws, xt, wt, spec, div, None, tg)
    close(loss, e_loss, 2e-5)
    close(dx, e_dx, 2e-5)
    close(dw, e_dw, 2e-5)
    loss_only, none_dx, none_dw = tri.divergence(xs, ws, xt, wt, spec, div, None, None)
    assert none_dx is None and none_dw is None
    close(loss_only, loss, 1e-6)


@pytest.mark.parametrize("kind,tail,clip,k", [
    ("reverse_kl", "bucket", None, 6),
    ("forward_kl", "renorm", None, 6),
    ("jsd", "none", None, 6),
    ("jsd", "bucket", 0.01, 4),
    ("reverse_kl", "bucket", None, 29),  # k == V: empty tail
])
def test_divergence_teacher_topk(slices, kind, tail, clip, k):
    N, H, V = 11, 24, 29
    spec = SPECS["all"]
    xs, ws = rand_lm(N, H, V, scale=2.0)
    xt, wt = rand_lm(N, 16, V, scale=2.0)  # the teacher may have another hidden size
    K = torch.stack([torch.randperm(V)[:k] for _ in range(N)]).to(DEV)
    div = DivergenceSpec(kind=kind, beta=0.4, support="teacher_topk", tail=tail, term_clip=clip)
    tg = torch.randn(N, device=DEV)
    loss, dx, dw = tri.divergence(xs, ws, xt, wt, spec, div, K, tg)
    e_loss, e_dx, e_dw = dense_div_grads(xs, ws, xt, wt, spec, div, K, tg)
    close(loss, e_loss, 2e-5)
    close(dx, e_dx, 2e-5)
    close(dw, e_dw, 2e-5)
    r_loss, r_dx, r_dw = ref.divergence(xs, ws, xt, wt, spec, div, K, tg)
    close(loss, r_loss, 2e-5)
    close(dw, r_dw, 2e-5)


@pytest.mark.parametrize("support", ["full", "teacher_topk"])
def test_divergence_identical_is_zero(support):
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


def test_divergence_extreme_one_hot_teacher(slices):
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
        exact = dense_div_grads(xs, ws, xt, wt, LogitSpec(), div, K, tg)
        for a, r, e in zip(got, fp32, exact):
            assert torch.isfinite(a).all()
            k_err = (a.double().cpu() - e).abs().max().item()
            r_err = (r.double().cpu() - e).abs().max().item()
            assert k_err <= 2 * r_err + 1e-5 * (1 + e.abs().max().item()), (div.kind, k_err, r_err)


@pytest.mark.parametrize("N,V,kind,clip,spec", [
    (1, 67, "reverse_kl", None, "all"),  # one token; odd V over several row blocks / tiles
    (5, 1, "jsd", None, "plain"),  # one vocabulary entry: zero divergence and gradient
    (6, 67, "jsd", 0.005, "all"),
    (6, 67, "forward_kl", 0.01, "plain"),
])
def test_divergence_shapes_vs_reference(slices, N, V, kind, clip, spec):
    spec = SPECS[spec]
    xs, ws = rand_lm(N, 20, V, scale=3.0)
    xt, wt = rand_lm(N, 12, V, scale=3.0)
    div = DivergenceSpec(kind=kind, beta=0.7, term_clip=clip)
    tg = torch.randn(N, device=DEV)
    got = tri.divergence(xs, ws, xt, wt, spec, div, None, tg)
    exact = dense_div_grads(xs, ws, xt, wt, spec, div, None, tg)
    refr = ref.divergence(xs, ws, xt, wt, spec, div, None, tg)
    for a, e, r in zip(got, exact, refr):
        close(a, e, 2e-5)
        close(a, r, 2e-5)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_public_op_reductions_match_reference(slices, reduction):
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


def test_path_env_is_checked(monkeypatch):
    monkeypatch.setenv("COPSD_TRITON_PATH", "fastest")
    x, w = rand_lm(2, 16, 5)
    with pytest.raises(ValueError, match="COPSD_TRITON_PATH"):
        tri.logprobs_forward(x, w, torch.zeros(2, dtype=torch.int64, device=DEV), LogitSpec())


@path_independent
def test_topk_merge_wrapper_validates_on_cpu():
    v = torch.randn(4, 10)
    i = torch.arange(40).view(4, 10)
    with pytest.raises(ValueError, match="CUDA tensors"):
        _cuda_topk.topk_merge(v, i, 3)


def test_empty_token_set():
    x, w = rand_lm(0, 16, 20)
    loss, dx, dw = tri.divergence(x, w, x, w, LogitSpec(), DivergenceSpec(), None, torch.zeros(0, device=DEV))
    assert loss.shape == (0,) and dx.shape == (0, 16) and (dw == 0).all()


# The sm_90 compile check of every Triton kernel (the row kernels included) is tests/test_triton_sm90.py.


# ----------------------------------------------------------------------------- GPU


def bf16_criterion(kernel, exact, torch_low):
    """FlashAttention criterion: kernel error <= 2x the error of plain PyTorch in the same precision."""
    k_err = (kernel.double().cpu() - exact).abs().max().item()
    t_err = (torch_low.double().cpu() - exact).abs().max().item()
    assert k_err <= 2 * t_err + 1e-6, f"kernel err {k_err} vs torch-bf16 err {t_err}"


# GPU tests use few kernel variants on purpose (each compiles for ~15-30 s; the GPU benchmark
# reuses the bf16 plain-logit ones from the Triton cache); the interpreter tests cover every option.


@pytest.mark.gpu
def test_gpu_fp32_odd_shapes_all_options():
    N, H, V = 300, 256, 5003
    xs, ws = rand_lm(N, H, V, scale=4.0)
    xt, wt = rand_lm(N, H, V, scale=4.0)
    spec, div = SPECS["all"], DivergenceSpec(kind="jsd", beta=0.3, term_clip=0.05)
    tg = torch.randn(N, device=DEV)
    loss, dx, dw = tri.divergence(xs, ws, xt, wt, spec, div, None, tg)
    e_loss, e_dx, e_dw = dense_div_grads(xs, ws, xt, wt, spec, div, None, tg)
    close(loss, e_loss, 1e-4)
    close(dx, e_dx, 1e-4)
    close(dw, e_dw, 1e-4)


@pytest.mark.gpu
def test_gpu_bf16_flash_criterion(monkeypatch):
    N, H, V = 256, 512, 8000
    monkeypatch.setattr(tri, "CHUNK_BYTES", 100 * V * 10)  # chunked path: 3 token chunks (dW accumulated)
    xs, ws = rand_lm(N, H, V, scale=4.0, dtype=torch.bfloat16)
    xt, wt = rand_lm(N, H, V, scale=4.0, dtype=torch.bfloat16)
    tg = torch.randn(N, device=DEV)
    div = DivergenceSpec(kind="reverse_kl")
    loss, dx, dw = tri.divergence(xs, ws, xt, wt, LogitSpec(), div, None, tg)
    e_loss, e_dx, e_dw = dense_div_grads(xs, ws, xt, wt, LogitSpec(), div, None, tg)
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
    (elp, eent, _), e_dx, e_dw = dense_logprobs_grads(xs, ws, ids, LogitSpec(), g)
    xl = xs.detach().clone().requires_grad_()
    wl = ws.detach().clone().requires_grad_()
    tlp, tent, _ = dense.logprobs(xl, wl, ids)
    (tlp * g[0].bfloat16() + tent * g[1].bfloat16()).sum().backward()
    bf16_criterion(lp, elp, tlp.detach())
    bf16_criterion(ent, eent, tent.detach())
    dx, dw = tri.logprobs_backward(xs, ws, ids, lse, ent, *g, LogitSpec())
    bf16_criterion(dx, e_dx, xl.grad)
    bf16_criterion(dw, e_dw, wl.grad)


@pytest.mark.gpu
def test_gpu_full_vocab_151936():
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
    check_topk(tids, tlp, tlse, xs.float(), ws.float(), 64, spec)


@pytest.mark.gpu
@path_independent
def test_gpu_fp32_output_gemms():
    # The chunked path relies on cuBLAS bf16 GEMMs with fp32 output / in-place fp32 accumulation
    # (torch.mm/addmm out_dtype); a bf16-rounded fallback would lose ~3 digits: check it is active.
    g = torch.Generator(device=DEV).manual_seed(0)
    a = torch.randn(300, 1000, device=DEV, generator=g).bfloat16()
    b = torch.randn(1000, 500, device=DEV, generator=g).bfloat16()
    want = a.double() @ b.double()
    out = torch.empty(300, 500, device=DEV)
    tc.mm_f32(a, b, out)
    assert tc._OUT_DTYPE["ok"] is True
    assert (out.double() - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    acc = out.clone()
    tc.addmm_f32(acc, a, b)
    assert tc._ADDMM_OK.get((a.device, a.dtype)) is True
    assert (acc.double() - 2 * want).abs().max().item() <= 2e-4 * want.abs().max().item()


@pytest.mark.gpu
@path_independent
@pytest.mark.parametrize("k,M", [(64, 1024), (1, 37), (50, 50), (100, 3000)])
def test_gpu_cuda_topk_merge(k, M):
    pytest.importorskip("copsd._cuda")
    rows = 77
    vals = torch.randn(rows, M, device=DEV)
    vals[:, ::7] = vals[:, :1]  # ties
    ids = torch.randperm(rows * M, device=DEV).view(rows, M)
    v, i = _cuda_topk.topk_merge(vals, ids, k)
    ev = vals.topk(k, dim=1).values
    torch.testing.assert_close(v, ev, rtol=0, atol=0)
    torch.testing.assert_close(vals.gather(1, (ids.unsqueeze(2) == i.unsqueeze(1)).float().argmax(1)), v)
    rv, ri = torch.ops.copsd_cuda.topk_merge(vals, ids, k)  # the raw op, valid arguments
    assert torch.equal(rv, v) and torch.equal(ri, i)
    # user-facing errors come from the Python wrapper
    with pytest.raises(ValueError, match="k must be"):
        _cuda_topk.topk_merge(vals, ids, M + 1)
    with pytest.raises(ValueError, match="float32"):
        _cuda_topk.topk_merge(vals.double(), ids, k)
    with pytest.raises(ValueError, match="int64"):
        _cuda_topk.topk_merge(vals, ids.int(), k)
    with pytest.raises(ValueError, match="shape"):
        _cuda_topk.topk_merge(vals, ids[:, :-1], k)


RAW_ERROR_SCRIPT = """
import torch, copsd._cuda
v = torch.randn(3, 5, device="cuda")
i = torch.arange(15, device="cuda").view(3, 5)
try:
    torch.ops.copsd_cuda.topk_merge(v, i, 6)
except Exception as e:
    print("RAISED", type(e).__name__, str(e).splitlines()[0])
else:
    print("NO ERROR")
"""


@pytest.mark.gpu
@path_independent
def test_gpu_cuda_topk_merge_raw_error_path_in_subprocess():
    # The C++ guard of the raw op (TORCH_CHECK_VALUE) crashed the process on the first GPU run; run
    # it in a child so that a crash is reported as this test's failure, not a dead test session.
    pytest.importorskip("copsd._cuda")
    r = subprocess.run([sys.executable, "-c", RAW_ERROR_SCRIPT], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, f"raw op error path crashed (rc {r.returncode}): {r.stderr[-1500:]}"
    assert "RAISED" in r.stdout and "k must be" in r.stdout, r.stdout
