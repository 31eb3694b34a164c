"""copsd's own fp32 logits GEMM (``csrc/cpu/gemm_f32.*``): fp32 hidden states times a packed fp32 lm_head on AVX-512
FMAs, which the chunk logits of every op take instead of MKL's packed GEMM where the CPU has AVX-512.

The kernel alone (``copsd._C.f32_gemm``) is checked against float64 with the error-relative criterion of
``tests/criteria.py`` (the plain computation: torch's fp32 GEMM): 1 row, 1 vocabulary row, row and vocabulary counts
that are no multiple of the 6 x 64 block, hidden sizes that are no multiple of the 16-wide vector pack, reductions
past the kernel's 1024-deep blocks, row counts past its row blocks, hidden states with a row stride, large and small
magnitudes, 1 and 2 threads.  The ops' results on it are compared with float64 in ``tests/test_cpu_gemm.py`` (its
modes 'on' and 'mkl'); here the counters show which GEMM ran, ``COPSD_CPU_F32_GEMM=0`` and ``COPSD_CPU_ISA=avx2``
switch it off, and a bad value of the knob is an error.  On a CPU without AVX-512 the kernel tests are skipped by
name and the fallback is checked to be in effect.
"""

import os
import subprocess
import sys

import criteria
import pytest
import torch

from copsd.backends import cpu
from copsd.ops._spec import DivergenceSpec, LogitSpec

pytestmark = pytest.mark.skipif(not cpu.available(), reason="copsd._C (C++ CPU extension) is not built")
NO_KERNEL = "this CPU (or COPSD_CPU_ISA) has no AVX-512: packed fp32 logits run on MKL's packed GEMM"


def _C():
    from copsd import _C
    return _C


@pytest.fixture(autouse=True)
def _knob(monkeypatch):
    monkeypatch.delenv("COPSD_CPU_F32_GEMM", raising=False)


def _f64(*shape, gen, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


@pytest.mark.parametrize("m,n,K,block,threads", [
    (1, 1, 1, 64, 1),           # one of everything
    (1, 4099, 256, 4099, 2),    # one row (the 1-row kernel), a vocabulary tail of 3
    (5, 63, 3, 64, 1),          # a hidden size below the 16-wide vector pack
    (6, 64, 16, 64, 2),         # exactly one block and one vector pack, more threads than panels
    (13, 130, 255, 64, 2),      # row tail 1, vocabulary tail 2, hidden tail 15
    (17, 1000, 1025, 256, 2),   # two reduction blocks (the second of 1), blocks of 256 with a tail
    (64, 2053, 2100, 1024, 2),  # three reduction blocks, 3 vocabulary blocks
    (300, 200, 1024, 200, 1),   # 3 row blocks of 128 rows (the last of 44)
    (7, 192, 64, 192, 1),       # whole panels: the vector pack alone
])
def test_kernel_against_float64(m, n, K, block, threads):
    g = torch.Generator().manual_seed(m * 1_000_003 + n * 1009 + K)
    x, w = _f64(m, K, gen=g).float(), _f64(n, K, gen=g).float()
    if not _C().f32_gemm_available():
        with pytest.raises(RuntimeError, match="AVX-512"):
            _C().f32_gemm(x, w, block, threads)
        return
    got = _C().f32_gemm(x, w, block, threads)
    exact = x.double() @ w.double().T
    plain = x @ w.T
    criteria.assert_accurate(got, exact, plain, f"logits {m}x{n}x{K}", dtype=torch.float32)


def _kernel():
    if not _C().f32_gemm_available():
        pytest.skip(NO_KERNEL)


def test_kernel_strided_rows():
    """Hidden states read in place with a row stride (a column slice of a wider tensor); nothing outside is read."""
    _kernel()
    g = torch.Generator().manual_seed(5)
    wide = _f64(29, 300, gen=g).float()
    x = wide[:, 7:7 + 131]
    w = _f64(777, 131, gen=g).float()
    got = _C().f32_gemm(x, w, 512, 2)
    criteria.assert_accurate(got, x.double() @ w.double().T, x @ w.T, "strided rows", dtype=torch.float32)
    wide[:, :7] = float("nan")  # outside the view: must not reach the result
    wide[:, 138:] = float("nan")
    assert torch.isfinite(_C().f32_gemm(x, w, 512, 2)).all()


@pytest.mark.parametrize("scale", [1e-3, 3e2, 2e18])
def test_kernel_magnitudes(scale):
    """Small and large operands (products up to ~1e37, sums near the fp32 range) keep the fp32 GEMM's accuracy."""
    _kernel()
    g = torch.Generator().manual_seed(int(scale * 7) % 100_003)
    x, w = _f64(33, 300, gen=g, scale=scale).float(), _f64(777, 300, gen=g, scale=scale / 50).float()
    got = _C().f32_gemm(x, w, 512, 2)
    assert torch.isfinite(got).all()
    criteria.assert_accurate(got, x.double() @ w.double().T, x @ w.T, f"logits at scale {scale:g}",
                             dtype=torch.float32)


def _divergence(n=40, v=2053, h=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, xt = _f64(n, h, gen=g).float(), _f64(n, h, gen=g).float()
    ws, wt = (_f64(v, h, gen=g) / h**0.5).float(), (_f64(v, h, gen=g) / h**0.5).float()
    return xs, ws, xt, wt


def _run_divergence(monkeypatch, knob):
    """Reverse KL with gradients, 3 chunks of 16 rows; returns (loss, d_hidden, d_weight) and the GEMM counters."""
    if knob is not None:
        monkeypatch.setenv("COPSD_CPU_F32_GEMM", knob)
    xs, ws, xt, wt = _divergence()
    monkeypatch.setattr(cpu, "WORKSPACE_BYTES", 16 * 2 * ws.shape[0] * 4)
    _C().gemm_stats_reset()
    tg = torch.rand(xs.shape[0], generator=torch.Generator().manual_seed(1))
    out = cpu.divergence(xs, ws, xt, wt, LogitSpec(temperature=1.3), DivergenceSpec(kind="reverse_kl"), None, tg)
    return out, _C().gemm_stats()


def test_ops_take_the_kernel_and_the_knob_turns_it_off(monkeypatch):
    """Default: every chunk's logits on the kernel where the CPU has AVX-512, none elsewhere; COPSD_CPU_F32_GEMM=0:
    none anywhere (MKL's packed GEMM where found).  Both give the same values to fp32 rounding."""
    kernel = _C().f32_gemm_available()
    on, st_on = _run_divergence(monkeypatch, None)
    off, st_off = _run_divergence(monkeypatch, "0")
    chunks = 3
    if kernel:
        assert st_on["f32_gemms"] == 2 * chunks and st_on["packed_gemms"] == 2 * chunks, st_on
    else:
        assert st_on["f32_gemms"] == 0, st_on
    assert st_off["f32_gemms"] == 0, st_off
    for a, b, what in zip(on, off, ("loss", "d_hidden", "d_weight")):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=lambda m, w=what: f"{w}: {m}")


def test_bad_knob_value_is_an_error(monkeypatch):
    monkeypatch.setenv("COPSD_CPU_F32_GEMM", "fast")
    with pytest.raises(RuntimeError, match="COPSD_CPU_F32_GEMM"):
        _C().f32_gemm_available()


def test_isa_cap_turns_it_off():
    """COPSD_CPU_ISA=avx2 (read once per process): no kernel, whatever the CPU."""
    code = ("from copsd import _C; import torch; "
            "print(_C.f32_gemm_available())")
    env = dict(os.environ, COPSD_CPU_ISA="avx2")
    env.pop("COPSD_CPU_F32_GEMM", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out
