"""``linear_logprobs``: log-probs of given ids, entropies and LSE (values and gradients) on every backend.

Ground truth: the dense float64 definitions of ``copsd.reference`` (through autograd for gradients); float32
and lower by the error-relative criterion of ``tests/criteria.py``.  Sections: the public op on the CPU
backends (reference, C++), the C++ backend's kernel-level functions (``isa``-marked ones rerun per dispatch
level by ``test_backend_cpu.py::test_cpu_dispatch_level``), the Triton backend (both GPU paths; interpreter
without a GPU).  ``linear_logprobs_loss`` is ``test_logprobs_loss.py``; torch.compile / opcheck:
``test_compile.py``.
"""

import pytest
import torch
from criteria import assert_accurate
from oplib import (
    CPU,
    CPU_BACKENDS,
    DEV,
    F64,
    LOGIT_OPTS,
    LOGITS,
    SPECS,
    TRITON,
    check_accurate,
    check_close,
    check_topk,
    close,
    close64,
    cpu_inputs,
    dense,
    fa_check,
    rand_lm,
    spec_kwargs,
)

from copsd.backends import cpu, reference
from copsd.backends import reference as ref
from copsd.backends import triton as tri
from copsd.ops import linear_logprobs
from copsd.ops._spec import LogitSpec

# ----------------------------------------------------------------------------- public op (reference, C++)


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
    check_close(lp, rlp, **tol)
    check_close(ent, rent, **tol)
    check_close(lse, rlse, **tol)
    ups = [torch.randn(N, dtype=F64) for _ in range(3)]
    got = torch.autograd.grad(sum((o * u).sum() for o, u in zip((lp, ent, lse), ups)), (x, w))
    want = torch.autograd.grad(sum((o * u).sum() for o, u in zip((rlp, rent, rlse), ups)), (x, w))
    for g, r in zip(got, want):
        check_close(g, r, **tol)
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


# ----------------------------------------------------------------------------- C++ CPU backend


@CPU
@pytest.mark.isa
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("logit_name", ["plain", "temp_scale_softcap", "temp_scale"])
@pytest.mark.parametrize("grads", ["all", "lp_only", "ent_lse"])
def test_cpu_logprobs_matches_dense(logit_name, dtype, grads):
    N, H, V = 29, 12, 211
    logit = LOGITS[logit_name]
    x, w, _, _ = cpu_inputs(N, H, V, dtype, scale=1.5)
    ids = torch.randint(0, V, (N,))
    lp, ent, lse = cpu.logprobs_forward(x, w, ids, logit)
    gs = [torch.randn(N, dtype=dtype) for _ in range(3)]
    if grads == "lp_only":
        gs[1] = gs[2] = None
    elif grads == "ent_lse":
        gs[0] = None
    dx, dw = cpu.logprobs_backward(x, w, ids, lse, ent, *gs, logit)
    exact = dense.logprobs_grads(x, w, ids, logit, gs)
    plain = exact if dtype == torch.float64 else dense.logprobs_grads(x, w, ids, logit, gs, torch.float32)
    check_accurate((lp, ent, lse, dx, dw), (*exact[0], *exact[1:]), (*plain[0], *plain[1:]),
                   ("logprobs", "entropy", "lse", "d_hidden", "d_weight"), dtype)


@CPU
def test_cpu_logprobs_matches_reference_backend(small_chunks):
    N, H, V = 17, 9, 130
    logit = LOGITS["temp_scale_softcap"]
    x, w, _, _ = cpu_inputs(N, H, V, torch.float64)
    ids = torch.randint(0, V, (N,))
    got = cpu.logprobs_forward(x, w, ids, logit)
    want = reference.logprobs_forward(x, w, ids, logit)
    for g, wv in zip(got, want):
        close64(g, wv, "forward")
    gs = [torch.randn(N, dtype=torch.float64) for _ in range(3)]
    got = cpu.logprobs_backward(x, w, ids, want[2], want[1], *gs, logit)
    want = reference.logprobs_backward(x, w, ids, want[2], want[1], *gs, logit)
    for g, wv in zip(got, want):
        close64(g, wv, "backward")


@CPU
@pytest.mark.isa
def test_cpu_logprobs_extreme_and_tiny_vocab():
    x, w, _, _ = cpu_inputs(8, 6, 211, torch.float32, scale=3e3)
    ids = torch.randint(0, 211, (8,))
    got = cpu.logprobs_forward(x, w, ids, LogitSpec())
    for g in got:
        assert torch.isfinite(g).all()
    exact = dense.logprobs(x.double(), w.double(), ids)
    plain = dense.logprobs(x, w, ids)  # fp32 logits of ~1e4 carry ~1e-3 error, here as in the op
    check_accurate(got, exact, plain, ("logprobs", "entropy", "lse"), torch.float32)
    x, w, _, _ = cpu_inputs(3, 4, 1, torch.float32)
    lp, ent, lse = cpu.logprobs_forward(x, w, torch.zeros(3, dtype=torch.int64), LogitSpec())
    assert torch.equal(lp, torch.zeros(3)) and torch.equal(ent, torch.zeros(3))
    assert_accurate(lse, (x.double() @ w.double().T)[:, 0], (x @ w.T)[:, 0], "lse at V=1")


@CPU
@pytest.mark.isa
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("logit_name", ["plain", "temp_scale"])
@pytest.mark.parametrize("shape", ["ascending", "descending", "spread", "tail_peak"])
def test_cpu_logprobs_row_shapes(shape, logit_name, dtype):
    """Rows whose maximum moves across the vocabulary blocks of the online statistics (ascending: raised in
    every block), a vocabulary that is no multiple of the block or the vector width, large logits and per-token
    upstream gradients: forward, recomputing backward and the 3-GEMM loss path against float64.  The loss path
    gets logits up to ~500 (its gradient takes the exact row maximum and log S apart); the recomputing backward
    only has the fp32 LSE, whose rounding (~|LSE| ulps) enters every probability, so it gets logits up to ~70
    (a limit of the saved fp32 LSE, not of the kernel)."""
    N, H, V = 6, 3, 1541
    g = torch.Generator().manual_seed(7)
    base = torch.linspace(-6.0, 6.0, V, dtype=torch.float64)
    col = {"ascending": base, "descending": base.flip(0),
           "spread": torch.randn(V, generator=g, dtype=torch.float64) * 4.0,
           "tail_peak": torch.where(torch.arange(V) == V - 3, 9.0, -1.0).double()}[shape]
    # z[n, v] = x[n, 0] * col[v] + x[n, 1:] . w[v, 1:]: the shaped column dominates
    w = torch.cat([col[:, None], torch.randn(V, H - 1, generator=g, dtype=torch.float64) * 0.3], 1).to(dtype)
    x0 = torch.randn(N, H, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, V - 1, V // 2, V - 3, 511, 512])
    logit = LOGITS[logit_name]
    gs = [torch.randn(N, generator=g, dtype=dtype) for _ in range(3)]

    def inputs(col0):
        x = x0.clone()
        x[:, 0] = torch.tensor(col0, dtype=torch.float64)
        return x.to(dtype)

    def refs(x, grads):
        exact = dense.logprobs_grads(x, w, ids, logit, grads)
        plain = exact if dtype == torch.float64 else dense.logprobs_grads(x, w, ids, logit, grads, torch.float32)
        return exact, plain

    x = inputs([1.0, 0.3, 2.0, 4.0, 6.0, -2.0])
    exact, plain = refs(x, gs)
    lp, ent, lse = cpu.logprobs_forward(x, w, ids, logit)
    dx, dw = cpu.logprobs_backward(x, w, ids, lse, ent, *gs, logit)
    check_accurate((lp, ent, lse, dx, dw), (*exact[0], *exact[1:]), (*plain[0], *plain[1:]),
                   ("logprobs", "entropy", "lse", "d_hidden", "d_weight"), dtype)

    def coeff(r0, rows, lp_c, ent_c):  # the loss path has no LSE term
        return gs[0][r0:r0 + rows], gs[1][r0:r0 + rows]

    x = inputs([1.0, 0.3, 7.0, 20.0, 40.0, -2.0])
    exact, plain = refs(x, [gs[0], gs[1], None])
    lp2, ent2, dx2, dw2 = cpu.logprobs_loss(x, w, ids, logit, coeff)
    check_accurate((lp2, ent2, dx2, dw2), (*exact[0][:2], *exact[1:]), (*plain[0][:2], *plain[1:]),
                   ("loss logprobs", "loss entropy", "loss d_hidden", "loss d_weight"), dtype)


@CPU
@pytest.mark.isa
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("logit_name", ["plain", "temp_scale_softcap"])
@pytest.mark.parametrize("nan_cols", [(0, 512), (0, 1024), (0, 1), (1500, 1541)])
def test_cpu_logprobs_nan_logits_are_reported(nan_cols, logit_name, dtype):
    """A NaN logit anywhere in a row makes that row's log-prob, entropy and LSE NaN (forward and loss path), also
    when it sits in the blocks before the row's first finite logit (the online statistics pass skips blocks that
    leave its maximum at -inf); rows without NaN stay exact."""
    N, H, V = 5, 8, 1541
    x, w, _, _ = cpu_inputs(N, H, V, dtype, scale=1.5)
    lo, hi = nan_cols
    w[lo:hi, 0] = float("nan")
    x[[0, 3], 0] = 0.0  # 0 * NaN is still NaN: every row's logits lo:hi are NaN
    ids = torch.tensor([hi % V, 3, 700, 1540, 0])
    logit = LOGITS[logit_name]
    def coeff(r0, rows, lp_c, ent_c):
        return torch.ones(rows, dtype=dtype), None

    outs = [cpu.logprobs_forward(x, w, ids, logit), cpu.logprobs_loss(x, w, ids, logit, coeff)[:2]]
    for out in outs:
        for t in out:
            assert torch.isnan(t).all(), (nan_cols, t)


@CPU
@pytest.mark.isa
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("logit_name", ["plain", "temp_scale_softcap"])
def test_cpu_logprobs_masked_rows(logit_name, dtype):
    """Tokens whose upstream gradients are all zero (masked): their d_hidden rows are exact zeros (the gradient
    pass writes the row's zeros without reading it), the other tokens as against float64; recomputing backward
    and the loss path."""
    N, H, V = 11, 8, 700
    x, w, _, _ = cpu_inputs(N, H, V, dtype, scale=1.5)
    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3))
    logit = LOGITS[logit_name]
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0], dtype=torch.bool)
    gs = [torch.randn(N, dtype=dtype) * mask for _ in range(3)]
    exact = dense.logprobs_grads(x, w, ids, logit, gs)
    plain = exact if dtype == torch.float64 else dense.logprobs_grads(x, w, ids, logit, gs, torch.float32)
    lp, ent, lse = cpu.logprobs_forward(x, w, ids, logit)
    dx, dw = cpu.logprobs_backward(x, w, ids, lse, ent, *gs, logit)
    check_accurate((dx, dw), exact[1:], plain[1:], ("d_hidden", "d_weight"), dtype)
    assert torch.equal(dx[~mask], torch.zeros_like(dx[~mask]))

    def coeff(r0, rows, lp_c, ent_c):
        return gs[0][r0:r0 + rows], gs[1][r0:r0 + rows]

    gs2 = [gs[0], gs[1], None]
    exact = dense.logprobs_grads(x, w, ids, logit, gs2)
    plain = exact if dtype == torch.float64 else dense.logprobs_grads(x, w, ids, logit, gs2, torch.float32)
    _, _, dx2, dw2 = cpu.logprobs_loss(x, w, ids, logit, coeff)
    check_accurate((dx2, dw2), exact[1:], plain[1:], ("loss d_hidden", "loss d_weight"), dtype)
    assert torch.equal(dx2[~mask], torch.zeros_like(dx2[~mask]))


@CPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_low_precision_logprobs_and_topk(dtype):
    N, H, V = 24, 16, 211
    x, w, _, _ = cpu_inputs(N, H, V, dtype)
    ids = torch.randint(0, V, (N,))
    got = cpu.logprobs_forward(x, w, ids, LogitSpec())
    a, b = x.double().clone().requires_grad_(), w.double().clone().requires_grad_()
    want = dense.logprobs(a, b, ids)
    plain = dense.logprobs(x, w, ids)
    for g, wv, pv, name in zip(got, want, plain, ("logprobs", "entropy", "lse")):
        fa_check(g, wv.detach(), pv, name)
    g_lp, g_ent = torch.randn(N), torch.randn(N)
    (want[0] * g_lp.double() + want[1] * g_ent.double()).sum().backward()
    dx, dw = cpu.logprobs_backward(x, w, ids, got[2], got[1], g_lp, g_ent, None, LogitSpec())
    pa, pb = x.clone().requires_grad_(), w.clone().requires_grad_()
    pl = dense.logprobs(pa, pb, ids)
    (pl[0] * g_lp.to(dtype) + pl[1] * g_ent.to(dtype)).sum().backward()
    fa_check(dx, a.grad, pa.grad, "d_hidden")
    fa_check(dw, b.grad, pb.grad, "d_weight")
    tids, tlp, tlse = cpu.topk(x, w, 5, LogitSpec())
    z64 = x.double() @ w.double().T
    plain_vals = (x @ w.T).log_softmax(-1).topk(5, dim=1).values
    fa_check(tlp, z64.log_softmax(-1).topk(5, dim=1).values, plain_vals, "topk logprobs")


@CPU
def test_cpu_public_logprobs_and_topk_ops_on_cpu_backend():
    ops = pytest.importorskip("copsd.ops")
    N, H, V = 20, 12, 211
    x, w, _, _ = cpu_inputs(N, H, V, torch.float32)
    ids = torch.randint(0, V, (N,))
    res = {}
    for name, backend, dtype in (("cpu", "cpu", torch.float32), ("exact", "reference", torch.float64),
                                 ("plain", "reference", torch.float32)):
        a, b = x.to(dtype).clone().requires_grad_(), w.to(dtype).clone().requires_grad_()
        lp, ent, lse = ops.linear_logprobs(a, b, ids, temperature=1.4, return_entropy=True, backend=backend)
        (lp.sum() + 0.3 * ent.sum() - 0.1 * lse.sum()).backward()
        res[name] = (lp.detach(), ent.detach(), lse.detach(), a.grad, b.grad)
    check_accurate(res["cpu"], res["exact"], res["plain"],
                   ("logprobs", "entropy", "lse", "d_hidden", "d_weight"), torch.float32)
    t_ids, t_lp, t_lse = ops.linear_topk(x, w, 16, backend="cpu")
    check_topk(t_ids, t_lp, t_lse, x.double() @ w.double().T, 16, x @ w.T)


@CPU
@pytest.mark.isa
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("logit_name", ["plain", "temp_scale_softcap"])
@pytest.mark.parametrize("rows,tile", [("1", "100"), ("3", "1031"), ("7", "512"), ("512", None), (None, "256")])
def test_cpu_logprobs_forward_in_tiles(rows, tile, logit_name, dtype, monkeypatch):
    """The forward's tiled driver (row groups ``COPSD_CPU_TOPK_ROWS``, vocabulary tiles ``COPSD_CPU_TOPK_TILE``,
    shared with the top-k): any group size, tiles that are and are not whole 512-entry blocks, a short last tile,
    ids in the first and the last tile, as against float64."""
    for name, val in (("COPSD_CPU_TOPK_ROWS", rows), ("COPSD_CPU_TOPK_TILE", tile)):
        if val is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, val)
    N, H, V = 13, 16, 2600
    logit = LOGITS[logit_name]
    x, w, _, _ = cpu_inputs(N, H, V, dtype, scale=1.5)
    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(5))
    ids[0], ids[1], ids[2] = 0, V - 1, 1030
    got = cpu.logprobs_forward(x, w, ids, logit)
    exact = dense.logprobs(x.double(), w.double(), ids, **spec_kwargs(logit))
    plain = exact if dtype == torch.float64 else dense.logprobs(x, w, ids, **spec_kwargs(logit))
    check_accurate(got, exact, plain, ("logprobs", "entropy", "lse"), dtype)


@CPU
@pytest.mark.parametrize("pack", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_tiled_drivers_take_inputs_that_require_grad(pack, dtype, monkeypatch):
    """The top-k and the log-prob forward run their GEMMs on the pool's threads.  Inputs that require grad (an
    lm_head in training) must work there on the unpacked path too (fp64, ``COPSD_CPU_PACK=0``, or a head over the
    pack budget): grad mode is per thread, and ``mm_out`` on a worker thread refused them."""
    monkeypatch.setenv("COPSD_CPU_PACK", pack)
    monkeypatch.setenv("COPSD_CPU_TOPK_ROWS", "5")  # several row groups, so several threads take part
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        N, H, V = 20, 8, 300
        x, w, _, _ = cpu_inputs(N, H, V, dtype)
        x, w = x.requires_grad_(), w.requires_grad_()
        ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2))
        got = cpu.logprobs_forward(x, w, ids, LogitSpec())
        t_ids, t_lp, t_lse = cpu.topk(x, w, 7, LogitSpec())
    finally:
        torch.set_num_threads(threads)
    x, w = x.detach(), w.detach()
    exact, plain = dense.logprobs(x.double(), w.double(), ids), dense.logprobs(x, w, ids)
    check_accurate(got, exact, plain if dtype == torch.float32 else exact, ("logprobs", "entropy", "lse"), dtype)
    check_topk(t_ids, t_lp, t_lse, x.double() @ w.double().T, 7, x @ w.T)


# ----------------------------------------------------------------------------- Triton backend


@TRITON
@pytest.mark.parametrize("N,H,V,spec,which", [
    (19, 40, 53, "plain", (1, 1, 1)),
    (19, 40, 53, "all", (1, 0, 1)),
    (1, 24, 1, "all", (1, 1, 0)),  # one token, one vocabulary entry
])
def test_triton_logprobs_forward_backward(triton_slices, N, H, V, spec, which):
    spec = SPECS[spec]
    x, w = rand_lm(N, H, V, scale=3.0)
    ids = torch.randint(0, V, (N,), device=DEV)
    out = tri.logprobs_forward(x, w, ids, spec)
    g = [torch.randn(N, device=DEV) if on else None for on in which]
    (lp, ent, lse), dx_d, dw_d = dense.logprobs_grads(x, w, ids, spec, g)
    for a, e in zip(out, (lp, ent, lse)):
        close(a, e, 2e-5)
    dx, dw = tri.logprobs_backward(x, w, ids, out[2], out[1], *g, spec)
    assert dw.dtype == torch.float32
    close(dx, dx_d, 2e-5)
    close(dw, dw_d, 2e-5)
    rdx, rdw = ref.logprobs_backward(x, w, ids, out[2], out[1], *g, spec)
    close(dx, rdx, 2e-5)
    close(dw, rdw, 2e-5)


@TRITON
def test_triton_logprobs_extreme_logits():
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
    _, dx_d, dw_d = dense.logprobs_grads(x, w, ids, spec, (g, g, None))
    close(dx, dx_d, 1e-4)
    close(dw, dw_d, 1e-4)
