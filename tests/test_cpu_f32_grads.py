"""The gradient GEMMs of a vocabulary tile on copsd's own fp32 kernel (``csrc/cpu/gemm_f32*``, ``gemm_nn``):
d_hidden (+)= G W[tile] and d_weight[tile] (+)= G^T x with both operands read in place (G's rows, or its columns
through a transposed view), on AVX-512 CPUs, for hidden sizes that are a multiple of the kernel's 64-wide panel
(by default where they measured at least about as fast as MKL's on this machine, once per process;
``COPSD_CPU_F32_GRADS=1`` / ``0`` force them on / off; ``COPSD_CPU_F32_GEMM=0`` keeps MKL's too).

The product alone (``copsd._C.f32_mm``) at each ISA level the CPU has is checked against float64 with the
error-relative criterion of ``tests/criteria.py`` (plain: torch's fp32 GEMM): 1 row, 1-deep and 0-deep reductions,
reductions past the 256-deep passes with a tail, row counts past the row blocks, A read through a transposed view,
accumulation into an existing C, extreme magnitudes.  The ops (divergence, recomputing log-prob backward, loss path)
on 3 chunks, with one tile per run and with runs of several tiles, fp32 and bf16 inputs, are checked against float64
with the kernel on and off, and the counters show which GEMMs ran.
"""

import criteria
import dense
import pytest
import torch
from oplib import cpu_inputs, run_json

from copsd.backends import cpu
from copsd.ops._spec import DivergenceSpec, LogitSpec

pytestmark = pytest.mark.skipif(not cpu.available(), reason="copsd._C (C++ CPU extension) is not built")
LEVELS = [2, 1]  # AVX-512 (64-wide panels), AVX2 (16-wide)
PANEL = {2: 64, 1: 16}


def _C():
    from copsd import _C
    return _C


@pytest.fixture(autouse=True)
def _knobs(monkeypatch):
    for k in ("COPSD_CPU_F32_GEMM", "COPSD_CPU_F32_GRADS", "COPSD_CPU_BF16_GEMM", "COPSD_CPU_TOPK_TILE",
              "COPSD_CPU_DYNAMIC"):
        monkeypatch.delenv(k, raising=False)


def _level(level):
    if level > _C().f32_gemm_level():
        pytest.skip(f"this CPU (or COPSD_CPU_ISA) is below ISA level {level} (2 AVX-512, 1 AVX2)")


def _f64(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("m,K,panels", [
    (1, 1, 1),       # one of everything
    (7, 3, 1),       # a row tail (6 + 1), a short reduction
    (13, 257, 2),    # a 256-deep pass and a 1-deep one
    (600, 300, 1),   # row blocks of 512 rows (the last of 88) at a 256-deep pass
    (64, 2100, 3),   # nine passes, the last of 52: a vocabulary tile's d_hidden
])
@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_mm_against_float64(level, m, K, panels, layout):
    """C = A @ B, A read in place as rows (d_hidden: G) or through a transposed view (d_weight: G^T); then C += A @ B
    into that C."""
    if level > _C().f32_gemm_level():
        with pytest.raises(RuntimeError, match="level"):
            _C().f32_mm(torch.ones(2, 2), torch.ones(2, PANEL[level]), None, level)
        return
    n = panels * PANEL[level]
    a64 = _f64(m, K, seed=m + K) if layout == "rows" else _f64(K, m, seed=m + K).T
    b64 = _f64(K, n, seed=3 * K + n)
    a, b = a64.float(), b64.float()
    assert (a.stride(1) == 1) == (layout == "rows" or K == 1)
    got = _C().f32_mm(a, b, None, level)
    criteria.assert_accurate(got, a64 @ b64, a @ b, f"{layout} {m}x{K}x{n}", dtype=torch.float32)
    c0 = _f64(m, n, seed=7).float()
    c = c0.clone()
    _C().f32_mm(a, b, c, level)
    criteria.assert_accurate(c, c0.double() + a64 @ b64, c0 + a @ b, f"{layout} {m}x{K}x{n} +=", dtype=torch.float32)


@pytest.mark.parametrize("level", LEVELS)
def test_mm_empty_reduction_and_bad_shapes(level):
    _level(level)
    n = PANEL[level]
    a, b = torch.empty(5, 0), torch.empty(0, n)
    assert torch.equal(_C().f32_mm(a, b, None, level), torch.zeros(5, n))
    c = torch.full((5, n), 3.0)
    _C().f32_mm(a, b, c, level)  # adds nothing
    assert torch.equal(c, torch.full((5, n), 3.0))
    with pytest.raises(RuntimeError, match=f"multiple of {n}"):
        _C().f32_mm(torch.ones(3, 4), torch.ones(4, n + 1), None, level)
    with pytest.raises(RuntimeError, match="unit stride"):
        _C().f32_mm(torch.ones(3, 4), torch.ones(2 * n, 4).T, None, level)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("scale", [1e-3, 2e18])
def test_mm_magnitudes(level, scale):
    _level(level)
    a64, b64 = _f64(33, 700, seed=1, scale=scale), _f64(700, 2 * PANEL[level], seed=2, scale=scale / 50)
    got = _C().f32_mm(a64.float(), b64.float(), None, level)
    assert torch.isfinite(got).all()
    criteria.assert_accurate(got, a64 @ b64, a64.float() @ b64.float(), f"scale {scale:g}", dtype=torch.float32)


def test_level_follows_knobs_and_hidden_size(monkeypatch):
    """The ops' level: AVX-512 only (the AVX2 kernel ran these products below MKL's), H a multiple of 64, by default
    where this process's measurement chose the kernel for them (f32_gemm_calibration()["grads"]), forced by
    COPSD_CPU_F32_GRADS=1, off with COPSD_CPU_F32_GRADS=0 or COPSD_CPU_F32_GEMM=0; a bad value is an error naming
    the knob."""
    logits = _C().f32_gemm_available() and _C().f32_gemm_level() == 2
    cal = _C().f32_gemm_calibration()
    assert _C().f32_grads_level(128) == (2 if logits and cal["grads"] else 0), cal
    assert _C().f32_grads_level(96) == 0
    for value in ("0", "false", "Off", "no"):
        monkeypatch.setenv("COPSD_CPU_F32_GRADS", value)
        assert _C().f32_grads_level(128) == 0, value
    for value in ("", "auto", "AUTO"):
        monkeypatch.setenv("COPSD_CPU_F32_GRADS", value)
        assert _C().f32_grads_level(128) == (2 if logits and cal["grads"] else 0), value
    monkeypatch.setenv("COPSD_CPU_F32_GRADS", "1")
    assert _C().f32_grads_level(128) == (2 if logits else 0)
    monkeypatch.setenv("COPSD_CPU_F32_GEMM", "0")
    assert _C().f32_grads_level(128) == 0
    monkeypatch.setenv("COPSD_CPU_F32_GRADS", "sometimes")
    with pytest.raises(RuntimeError, match="COPSD_CPU_F32_GRADS must be auto, 1 or 0"):
        _C().f32_grads_level(128)


_GRADS = ("import json; from copsd import _C; "
          "print(json.dumps(dict(_C.f32_gemm_calibration(), level128=_C.f32_grads_level(128))))")


@pytest.mark.parametrize("keep,on", [("0", False), ("1e9", True)])
def test_the_measurement_decides_the_grads(keep, on):
    """The gradient products' own measurement decides their default (COPSD_CPU_F32_GEMM_KEEP 0: MKL wins it, 1e9: the
    kernel does); the measurement ran on both and their products agreed; COPSD_CPU_F32_GRADS=1 still forces the
    kernel where the logits take it (COPSD_CPU_F32_GEMM=1 here)."""
    if _C().f32_gemm_level() != 2:
        pytest.skip("the tile gradient products take the kernel on AVX-512 only")
    got = run_json(_GRADS, drop=("COPSD_CPU_F32",), COPSD_CPU_F32_GEMM_KEEP=keep, COPSD_CPU_F32_GEMM="1")
    assert got["grads_agree"] and got["grads_kernel_s"] > 0 and got["grads_mkl_s"] > 0, got
    assert got["grads"] is on and got["level128"] == (2 if on else 0), got
    forced = run_json(_GRADS, drop=("COPSD_CPU_F32",), COPSD_CPU_F32_GEMM_KEEP=keep, COPSD_CPU_F32_GEMM="1",
                      COPSD_CPU_F32_GRADS="1")
    assert forced["level128"] == 2, forced


H, V, N, ROWS = 64, 2053, 41, 16  # 3 chunks of 16 + 16 + 9 rows
LOGIT = LogitSpec(temperature=1.3, logit_scale=0.9)


def _inputs(dtype):
    return cpu_inputs(N, H, V, dtype, scale=1.5, seed=31, dominant=7, ids=True)


def _logprobs_backward(x, w, ids, gs):
    _, ent, lse = cpu.logprobs_forward(x, w, ids, LOGIT)
    return cpu.logprobs_backward(x, w, ids, lse, ent, *gs, LOGIT)


@pytest.mark.parametrize("knob", ["on", "0"])
@pytest.mark.parametrize("tiles", ["default", "runs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_on_the_kernel(monkeypatch, knob, tiles, dtype):
    """Divergence (JSD), recomputing log-prob backward and the loss path against float64, 3 chunks (the first
    chunk's d_weight set, the later ones added), with the default tiles (one tile per run) and with 21 tiles of 100
    handed out as one fixed run of ~10 tiles per thread (COPSD_CPU_DYNAMIC=0: each d_hidden partial set by its run's
    first tile, added by the rest); bf16 inputs take the kernel on the up-cast weight rows."""
    if knob == "0":
        monkeypatch.setenv("COPSD_CPU_F32_GRADS", "0")
    if tiles == "runs":
        monkeypatch.setenv("COPSD_CPU_TOPK_TILE", "100")
        monkeypatch.setenv("COPSD_CPU_DYNAMIC", "0")
    monkeypatch.setattr(cpu, "WORKSPACE_BYTES", ROWS * 2 * V * 4)
    expect = knob == "on" and _C().f32_grads_level(H) == 2
    xs, ws, xt, wt, ids = _inputs(dtype)
    tg = torch.rand(N, generator=torch.Generator().manual_seed(32), dtype=torch.float64)
    gs = [torch.randn(N, generator=torch.Generator().manual_seed(i + 33)) for i in range(3)]
    a, b = gs[0], gs[1]
    div = DivergenceSpec(kind="jsd", beta=0.3)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for what, run, exact, plain in (
            ("divergence", lambda: cpu.divergence(xs, ws, xt, wt, LOGIT, div, None, tg.float())[1:],
             dense.divergence_grads(xs, ws, xt, wt, LOGIT, div, None, tg),
             dense.divergence_grads(xs, ws, xt, wt, LOGIT, div, None, tg, dtype=torch.float32)),
            ("log-prob backward", lambda: _logprobs_backward(xs, ws, ids, [g.float() for g in gs]),
             dense.logprobs_grads(xs, ws, ids, LOGIT, gs),
             dense.logprobs_grads(xs, ws, ids, LOGIT, gs, dtype=torch.float32)),
            ("loss path", lambda: cpu.logprobs_loss(
                xs, ws, ids, LOGIT, lambda r0, k, lp, e: (a[r0:r0 + k], b[r0:r0 + k]))[2:],
             dense.logprobs_grads(xs, ws, ids, LOGIT, (a, b, None)),
             dense.logprobs_grads(xs, ws, ids, LOGIT, (a, b, None), dtype=torch.float32)),
        ):
            _C().gemm_stats_reset()
            dx, dw = run()
            assert (_C().gemm_stats()["f32_grads"] > 0) == expect, (what, _C().gemm_stats())
            criteria.assert_accurate(dx, exact[1], plain[1], f"{what} d_hidden", dtype=torch.float32)
            criteria.assert_accurate(dw, exact[2], plain[2], f"{what} d_weight", dtype=torch.float32)
    finally:
        torch.set_num_threads(old)
