"""C++ CPU kernel internals: the vectorised exponential, and the fused epilogues at chunk shapes the other test
files do not reach.

Workspaces here hold 37 tokens per chunk (not a multiple of the 8 / 16 vector lanes) of a V = 5003 vocabulary,
with a few dominant vocabulary rows at the start, middle and end of the vocabulary so the running maxima move
late in a row; results are compared with dense float64 formulas (``tests/dense.py``) and autograd gradients.
"""

import os
import subprocess
import sys

import dense
import pytest
import torch

from copsd.backends import cpu
from copsd.ops._spec import DivergenceSpec, LogitSpec

pytestmark = pytest.mark.skipif(not cpu.available(), reason="copsd._C (C++ CPU extension) is not built")


def _exp(x):
    from copsd import _C
    return _C.exp(x)

# 37 tokens per chunk of a V = 5003 vocabulary; 83 tokens = 3 chunks, the last one partial.
N, H, V, ROWS = 83, 16, 5003, 37
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11)}


@pytest.fixture
def chunks(monkeypatch):
    def set_rows(dtype, sides):
        monkeypatch.setattr(cpu, "WORKSPACE_BYTES", ROWS * sides * V * (8 if dtype == torch.float64 else 4))
    return set_rows


def _inputs(dtype, scale=1.0, seed=0, peaked=False):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(N, H, generator=g, dtype=torch.float64) * scale
    xt = torch.randn(N, H, generator=g, dtype=torch.float64) * scale
    ws = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 2
    wt = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 2
    if peaked:
        # A few dominant vocabulary rows at the start, middle and end: maxima far above the bulk.
        for j, f in ((3, 6.0), (2600, 8.0), (V - 2, 7.0)):
            ws[j] *= f
            wt[j] *= f
    return [t.to(dtype) for t in (xs, ws, xt, wt)]


def _close(got, want, dtype, what):
    """float64: elementwise to ~1e-9.  float32: the largest error relative to the largest magnitude (logits of
    tens carry ~1e-6 relative rounding from the GEMM alone, which an elementwise rtol cannot absorb)."""
    if dtype == torch.float64:
        torch.testing.assert_close(got.double(), want.double(), **TOL[dtype], msg=lambda m: f"{what}: {m}")
        return
    err = (got.double() - want.double()).abs().max().item()
    scale = 1.0 + want.double().abs().max().item()
    assert err <= 2e-5 * scale, f"{what}: max error {err:.3g} > 2e-5 * {scale:.3g}"


LOGITS = {"plain": LogitSpec(), "temp_scale": LogitSpec(temperature=1.7, logit_scale=0.8),
          "softcap": LogitSpec(temperature=0.7, logit_scale=1.3, softcap=3.0)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("logit_name", list(LOGITS))
@pytest.mark.parametrize("kind,clip", [("reverse_kl", None), ("reverse_kl", 0.004), ("forward_kl", None),
                                       ("jsd", None)])
@pytest.mark.parametrize("peaked", [False, True])
def test_divergence_odd_chunks_peaked(chunks, dtype, logit_name, kind, clip, peaked):
    chunks(dtype, 2)
    logit = LOGITS[logit_name]
    xs, ws, xt, wt = _inputs(dtype, scale=1.3, peaked=peaked)
    tg = torch.rand(N, dtype=torch.float64)
    div = DivergenceSpec(kind=kind, beta=0.3, term_clip=clip)
    a = xs.double().clone().requires_grad_()
    b = ws.double().clone().requires_grad_()
    want = dense.divergence(a, b, xt.double(), wt.double(), kind=kind, beta=0.3, temperature=logit.temperature,
                            logit_scale=logit.logit_scale, softcap=logit.softcap, term_clip=clip)
    (want * tg).sum().backward()
    loss, dx, dw = cpu.divergence(xs, ws, xt, wt, logit, div, None, tg.to(dtype))
    _close(loss, want.detach(), dtype, "loss")
    _close(dx, a.grad, dtype, "d_hidden")
    _close(dw, b.grad, dtype, "d_weight")
    loss_only, none_x, none_w = cpu.divergence(xs, ws, xt, wt, logit, div, None, None)
    assert none_x is None and none_w is None
    torch.testing.assert_close(loss_only, loss)  # same loss with or without the gradient pass


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("logit_name", list(LOGITS))
def test_logprobs_odd_chunks_peaked(chunks, dtype, logit_name):
    chunks(dtype, 1)
    logit = LOGITS[logit_name]
    x, w, _, _ = _inputs(dtype, scale=1.5, peaked=True)
    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(1))
    ids[:4] = torch.tensor([3, 2600, V - 2, V - 1])  # ids at the dominant rows and the last entry
    a = x.double().clone().requires_grad_()
    b = w.double().clone().requires_grad_()
    want = dense.logprobs(a, b, ids, logit.temperature, logit.logit_scale, logit.softcap)
    lp, ent, lse = cpu.logprobs_forward(x, w, ids, logit)
    for g, wv, name in zip((lp, ent, lse), want, ("logprobs", "entropy", "lse")):
        _close(g, wv.detach(), dtype, name)
    gs = [torch.randn(N, dtype=dtype, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    sum((wv * g.double()).sum() for wv, g in zip(want, gs)).backward()
    dx, dw = cpu.logprobs_backward(x, w, ids, lse, ent, *gs, logit)
    _close(dx, a.grad, dtype, "d_hidden")
    _close(dw, b.grad, dtype, "d_weight")

    # The 3-GEMM loss path (statistics, coefficients, gradient from the kept logits).
    def coeff(r0, rows, lp_c, ent_c):
        return gs[0][r0:r0 + rows], gs[1][r0:r0 + rows]

    a.grad = b.grad = None
    want = dense.logprobs(a, b, ids, logit.temperature, logit.logit_scale, logit.softcap)
    ((want[0] * gs[0].double()).sum() + (want[1] * gs[1].double()).sum()).backward()
    lp2, ent2, dx2, dw2 = cpu.logprobs_loss(x, w, ids, logit, coeff)
    _close(lp2, want[0].detach(), dtype, "loss logprobs")
    _close(ent2, want[1].detach(), dtype, "loss entropy")
    _close(dx2, a.grad, dtype, "loss d_hidden")
    _close(dw2, b.grad, dtype, "loss d_weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_row_chunks_blocked_d_hidden(monkeypatch, dtype):
    """Chunks of 3 tokens (a matrix-vector product per chunk) at V = 5003: d_hidden is summed in vocabulary blocks,
    bf16 weights are up-cast block by block into one reused buffer; both against float64 of the same inputs."""
    monkeypatch.setattr(cpu, "WORKSPACE_BYTES", 3 * 2 * V * 4)
    xs, ws, xt, wt = _inputs(dtype, scale=1.3, peaked=True)
    tg = torch.rand(N, dtype=torch.float64)
    for kind in ("reverse_kl", "forward_kl", "jsd"):
        a = xs.double().clone().requires_grad_()
        b = ws.double().clone().requires_grad_()
        want = dense.divergence(a, b, xt.double(), wt.double(), kind=kind)
        (want * tg).sum().backward()
        loss, dx, dw = cpu.divergence(xs, ws, xt, wt, LogitSpec(), DivergenceSpec(kind=kind), None, tg.float())
        for g, w, name in ((loss, want.detach(), "loss"), (dx, a.grad, "d_hidden"), (dw, b.grad, "d_weight")):
            _close(g, w, torch.float32, f"{kind} {name}")
    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2))
    a = xs.double().clone().requires_grad_()
    b = ws.double().clone().requires_grad_()
    lp_w, ent_w, lse_w = dense.logprobs(a, b, ids)
    g = torch.rand(N, dtype=torch.float64)
    (lp_w * g).sum().backward()
    lp, ent, lse = cpu.logprobs_forward(xs, ws, ids, LogitSpec())
    dx, dw = cpu.logprobs_backward(xs, ws, ids, lse, ent, g.float(), None, None, LogitSpec())
    for got, w, name in ((lp, lp_w, "logprobs"), (ent, ent_w, "entropy"), (dx, a.grad, "d_hidden"),
                         (dw, b.grad, "d_weight")):
        _close(got, w.detach(), torch.float32, name)


def test_extreme_logits_odd_chunks(chunks):
    """Logits of several 1e3 with far-apart maxima: finite results, fp32 within its input rounding (an fp32
    logit of 5e3 is only known to ~5e-4)."""
    chunks(torch.float32, 2)
    xs, ws, xt, wt = _inputs(torch.float64, scale=300.0, peaked=True)
    assert (xs @ ws.T).abs().max() > 3e3
    tg = torch.rand(N, dtype=torch.float64)
    for kind in ("reverse_kl", "forward_kl", "jsd"):
        a = xs.clone().requires_grad_()
        b = ws.clone().requires_grad_()
        want = dense.divergence(a, b, xt, wt, kind=kind)
        (want * tg).sum().backward()
        want = (want.detach(), a.grad, b.grad)
        for dtype in (torch.float64, torch.float32):
            got = cpu.divergence(*[t.to(dtype) for t in (xs, ws, xt, wt)], LogitSpec(), DivergenceSpec(kind=kind),
                                 None, tg.to(dtype))
            for g, w, name in zip(got, want, ("loss", "d_hidden", "d_weight")):
                assert torch.isfinite(g).all(), (kind, dtype, name)
                tol = 1e-9 if dtype == torch.float64 else 1e-3
                assert (g.double() - w).abs().max().item() <= tol * (1.0 + w.abs().max().item()), (kind, dtype, name)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_repeated_calls_are_bitwise_equal(chunks, threads):
    """Repeated calls agree bit for bit at any thread count: the dynamic row schedules do not change results
    (every reduction over the vocabulary is within one row), the divergence's logits tiles handed out dynamically
    are each one GEMM whichever thread runs it, and the gradient GEMMs that run per vocabulary tile sum d_hidden
    in fixed groups of tiles, each group's partial in tile order whichever thread takes it, the partials in group
    order (the recomputing log-prob backward: the tiles dealt to the threads in a fixed order): divergence, log-probs
    forward + backward, the loss path."""
    chunks(torch.float32, 2)
    xs, ws, xt, wt = _inputs(torch.float32, peaked=True)
    tg = torch.rand(N)
    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(4))
    gs = [torch.randn(N, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def calls():
        out = list(cpu.divergence(xs, ws, xt, wt, LogitSpec(), DivergenceSpec(), None, tg))
        lp, ent, lse = cpu.logprobs_forward(xs, ws, ids, LogitSpec())
        out += [lp, ent, lse, *cpu.logprobs_backward(xs, ws, ids, lse, ent, *gs, LogitSpec())]
        out += list(cpu.logprobs_loss(xs, ws, ids, LogitSpec(), lambda r0, n, a, b: (gs[0][r0:r0 + n], None)))
        return out

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        first = calls()
        for _ in range(3):
            for i, (f, a) in enumerate(zip(first, calls())):
                assert torch.equal(f, a), i
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------- exp


def test_exp_float32_accuracy():
    """The polynomial exp: relative error <= 2 ulp (2.4e-7; measured 8.4e-8) against float64 exp over its whole
    finite range."""
    x = torch.linspace(-87.3, 88.0, 2_000_003, dtype=torch.float32)
    x = torch.cat([x, torch.rand(100_000) * 2 - 1, torch.tensor([0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5])])
    got = _exp(x).double()
    want = x.double().exp()
    rel = ((got - want).abs() / want).max().item()
    assert rel <= 2.4e-7, rel


def test_exp_float32_extremes():
    """Documented edges: x < -87.34 flushes to 0 (no denormals), x > 88 is +inf, NaN stays NaN."""
    x = torch.tensor([float("-inf"), -1e30, -104.0, -87.5, 88.5, 1e30, float("inf"), float("nan")])
    got = _exp(x)
    assert got[:4].eq(0).all(), got
    assert torch.isposinf(got[4:7]).all(), got
    assert torch.isnan(got[7])
    # Just inside the range: normal floats with the same accuracy.
    x = torch.tensor([-87.33, -80.0, 87.9, 88.0])
    rel = ((_exp(x).double() - x.double().exp()).abs() / x.double().exp()).max().item()
    assert rel <= 2.4e-7, rel


def test_exp_float64_is_libm():
    """float64 uses the C library's exp (correctly rounded to within an ulp)."""
    x = torch.linspace(-700, 700, 10_001, dtype=torch.float64)
    rel = ((_exp(x) - x.exp()).abs() / x.exp()).max().item()
    assert rel <= 4.5e-16, rel


def _log(x):
    from copsd import _C
    return _C.log(x)


def test_log_float32_accuracy():
    """The polynomial log (the JSD's per-entry mixture log): relative error <= 2 ulp (2.4e-7) against float64
    log from the smallest denormal to the largest float, and at most 2 ulp of absolute error near 1 (where the
    result itself goes to 0)."""
    x = torch.cat([torch.logspace(-45, 38, 2_000_003, dtype=torch.float64).float(), torch.rand(100_000) + 0.5,
                   torch.tensor([1e-45, 1.17e-38, 1.1754944e-38, 3.4e38, 1.0, 2.0, 0.5])])
    x = x[x > 0]
    got, want = _log(x).double(), x.double().log()
    far = (want.abs() > 0.5)
    rel = ((got - want).abs() / want.abs())[far].max().item()
    assert rel <= 2.4e-7, rel
    near = ((got - want).abs())[~far].max().item()
    assert near <= 2 * 5.96e-8, near


def test_log_float32_extremes():
    x = torch.tensor([0.0, -0.0, -1.0, float("-inf"), float("inf"), float("nan")])
    got = _log(x)
    assert torch.isneginf(got[:2]).all(), got
    assert torch.isnan(got[2]) and torch.isnan(got[3]) and torch.isnan(got[5]), got
    assert torch.isposinf(got[4]), got


def _tanh(x):
    from copsd import _C
    return _C.tanh(x)


@pytest.mark.isa
def test_tanh_float32_accuracy():
    """The vectorised tanh of the softcap transform: relative error <= 2 ulp (2.4e-7) against float64 tanh, on
    both sides of its switch at |x| = 0.625, down to tiny and up to saturated arguments."""
    x = torch.cat([torch.linspace(-12.0, 12.0, 2_000_001), torch.logspace(-30, 1.5, 200_001, dtype=torch.float64)
                   .float(), torch.tensor([0.625, -0.625, 0.62499994, 0.62500006, 1e-38, 1e-45])])
    x = torch.cat([x, -x])
    got, want = _tanh(x).double(), x.double().tanh()
    nz = want != 0
    rel = ((got - want).abs() / want.abs())[nz].max().item()
    assert rel <= 2.4e-7, rel
    assert torch.equal(got[~nz], want[~nz])


@pytest.mark.isa
def test_tanh_float32_extremes():
    """Saturates to exactly +-1 (also at +-inf and past exp's overflow), keeps the sign of zero, NaN stays NaN;
    float64 is the C library's tanh."""
    x = torch.tensor([20.0, 50.0, 1e30, float("inf"), -20.0, -1e30, float("-inf"), 0.0, -0.0, float("nan")])
    got = _tanh(x)
    assert torch.equal(got[:7], torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0])), got
    assert got[7] == 0 and not torch.signbit(got[7]) and got[8] == 0 and torch.signbit(got[8]), got
    assert torch.isnan(got[9])
    x = torch.linspace(-30, 30, 10_001, dtype=torch.float64)
    assert torch.allclose(_tanh(x), x.tanh(), rtol=4.5e-16, atol=0)


@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_exp_and_epilogues_on_other_isa(isa):
    """The baseline and AVX2 builds of the exp and the epilogues at these shapes (one ISA per process)."""
    if isa == "avx2" and cpu.isa() == "base":
        pytest.skip("CPU has no AVX2")
    code = (
        "import sys, torch; sys.path.insert(0, 'tests'); import dense\n"
        "from copsd.backends import cpu\n"
        "from copsd.ops._spec import LogitSpec, DivergenceSpec\n"
        f"assert cpu.isa() == '{isa}', cpu.isa()\n"
        "from copsd import _C\n"
        "x = torch.linspace(-87.3, 88.0, 200_003)\n"
        "rel = ((_C.exp(x).double() - x.double().exp()).abs() / x.double().exp()).max().item()\n"
        "assert rel <= 2.4e-7, rel\n"
        "x = torch.logspace(-40, 38, 200_003, dtype=torch.float64).float()\n"
        "y, want = _C.log(x).double(), x.double().log()\n"
        "assert ((y - want).abs() / want.abs().clamp(min=0.5)).max().item() <= 2.4e-7\n"
        "cpu.WORKSPACE_BYTES = 37 * 2 * 5003 * 4\n"
        "torch.manual_seed(0); N, H, V = 83, 16, 5003\n"
        "xs, xt = torch.randn(N, H), torch.randn(N, H); ws, wt = torch.randn(V, H) / 2, torch.randn(V, H) / 2\n"
        "ws[2600] *= 8\n"
        "for kind in ('reverse_kl', 'forward_kl', 'jsd'):\n"
        "    loss = cpu.divergence(xs, ws, xt, wt, LogitSpec(), DivergenceSpec(kind=kind), None, None)[0]\n"
        "    want = dense.divergence(xs.double(), ws.double(), xt.double(), wt.double(), kind=kind)\n"
        "    assert torch.allclose(loss.double(), want, rtol=2e-4, atol=2e-5), kind\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, COPSD_CPU_ISA=isa, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
