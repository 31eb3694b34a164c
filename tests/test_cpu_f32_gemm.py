"""copsd's own fp32 logits GEMM (``csrc/cpu/gemm_f32*``): fp32 hidden states times a packed fp32 lm_head on AVX-512 or
AVX2 FMAs, which the chunk logits of every op take instead of MKL's packed GEMM (by default where it measured at least
about as fast as MKL's on this machine, once per process; ``COPSD_CPU_F32_GEMM=1`` / ``0`` force it on / off).

The kernel alone (``copsd._C.f32_gemm``), at each ISA level the CPU has (2: AVX-512, 64-row panels; 1: AVX2, 16-row
panels), is checked against float64 with the error-relative criterion of
``tests/criteria.py`` (the plain computation: torch's fp32 GEMM): 1 row, 1 vocabulary row, row and vocabulary counts
that are no multiple of the 6 x 64 block, hidden sizes that are no multiple of the 16-wide vector pack, reductions
past the kernel's 1024-deep blocks, row counts past its row blocks, hidden states with a row stride, large and small
magnitudes, 1 and 2 threads.  The ops' results on it are compared with float64 in ``tests/test_cpu_gemm.py`` (its
modes 'on' and 'mkl'); here the counters show which GEMM ran, ``COPSD_CPU_F32_GEMM=0`` and ``COPSD_CPU_ISA=avx2``
switch it off or on, ``COPSD_CPU_ISA`` caps its level, the default follows its measurement, and a bad value of the
knob is an error.  A level the CPU
lacks is skipped by name, and asking the kernel for it is checked to be an error.
"""

import os
import subprocess
import sys

import criteria
import pytest
import torch
from oplib import run_json

from copsd.backends import cpu
from copsd.ops._spec import DivergenceSpec, LogitSpec

pytestmark = pytest.mark.skipif(not cpu.available(), reason="copsd._C (C++ CPU extension) is not built")
LEVELS = [2, 1]  # AVX-512, AVX2


def _C():
    from copsd import _C
    return _C


@pytest.fixture(autouse=True)
def _knob(monkeypatch):
    monkeypatch.delenv("COPSD_CPU_F32_GEMM", raising=False)


def _f64(*shape, gen, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("m,n,K,block,threads", [
    (1, 1, 1, 64, 1),           # one of everything
    (1, 4099, 256, 4099, 2),    # one row (the 1-row kernel), a vocabulary tail of 3
    (5, 63, 3, 64, 1),          # a hidden size below the 16-wide vector pack
    (6, 64, 16, 64, 2),         # exactly one block and one vector pack, more threads than panels
    (13, 130, 255, 64, 2),      # row tail 1, vocabulary tail 2 (AVX2: 2 of the 16-row panel), hidden tail 15
    (9, 75, 40, 75, 1),         # AVX2: a vocabulary tail of 11 (both halves of the last panel masked)
    (17, 1000, 1025, 256, 2),   # two reduction blocks (the second of 1), blocks of 256 with a tail
    (64, 2053, 2100, 1024, 2),  # three reduction blocks, 3 vocabulary blocks
    (300, 200, 1024, 200, 1),   # 3 row blocks of 128 rows (the last of 44)
    (7, 192, 64, 192, 1),       # whole panels: the vector pack alone
])
def test_kernel_against_float64(m, n, K, block, threads, level):
    g = torch.Generator().manual_seed(m * 1_000_003 + n * 1009 + K)
    x, w = _f64(m, K, gen=g).float(), _f64(n, K, gen=g).float()
    if level > _C().f32_gemm_level():
        with pytest.raises(RuntimeError, match="level"):
            _C().f32_gemm(x, w, block, threads, level)
        return
    got = _C().f32_gemm(x, w, block, threads, level)
    exact = x.double() @ w.double().T
    plain = x @ w.T
    criteria.assert_accurate(got, exact, plain, f"logits {m}x{n}x{K}", dtype=torch.float32)


def _kernel(level):
    if level > _C().f32_gemm_level():
        pytest.skip(f"this CPU (or COPSD_CPU_ISA) is below ISA level {level} (2 AVX-512, 1 AVX2)")


@pytest.mark.parametrize("level", LEVELS)
def test_kernel_strided_rows(level):
    """Hidden states read in place with a row stride (a column slice of a wider tensor); nothing outside is read."""
    _kernel(level)
    g = torch.Generator().manual_seed(5)
    wide = _f64(29, 300, gen=g).float()
    x = wide[:, 7:7 + 131]
    w = _f64(777, 131, gen=g).float()
    got = _C().f32_gemm(x, w, 512, 2, level)
    criteria.assert_accurate(got, x.double() @ w.double().T, x @ w.T, "strided rows", dtype=torch.float32)
    wide[:, :7] = float("nan")  # outside the view: must not reach the result
    wide[:, 138:] = float("nan")
    assert torch.isfinite(_C().f32_gemm(x, w, 512, 2, level)).all()


def test_kernel_refuses_overlapping_rows():
    """An expanded x (rows sharing storage) is refused by the kernel's binding (the ops take contiguous hidden states;
    their drivers' row views are read in place)."""
    _kernel(1)
    x = torch.randn(1, 40).expand(5, 40)
    with pytest.raises(RuntimeError, match="overlap"):
        _C().f32_gemm(x, torch.randn(70, 40), 64, 1, 1)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("scale", [1e-3, 3e2, 2e18])
def test_kernel_magnitudes(scale, level):
    """Small and large operands (products up to ~1e37, sums near the fp32 range) keep the fp32 GEMM's accuracy."""
    _kernel(level)
    g = torch.Generator().manual_seed(int(scale * 7) % 100_003)
    x, w = _f64(33, 300, gen=g, scale=scale).float(), _f64(777, 300, gen=g, scale=scale / 50).float()
    got = _C().f32_gemm(x, w, 512, 2, level)
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
    """Default: every chunk's logits on the kernel where f32_gemm_available() (AVX2 or AVX-512, measured here), none
    elsewhere; COPSD_CPU_F32_GEMM=1: on wherever the CPU has the ISA level; =0: nowhere (MKL's packed GEMM where
    found).  All give the same values to fp32 rounding."""
    default = _C().f32_gemm_available()
    chunks = 3
    results = {}
    for knob, on in ((None, default), ("1", _C().f32_gemm_level() > 0), ("0", False)):
        results[knob], st = _run_divergence(monkeypatch, knob)
        assert st["f32_gemms"] == (2 * chunks if on else 0), (knob, st)
        if on:
            assert st["packed_gemms"] == 2 * chunks, (knob, st)
    for knob in ("1", "0"):
        for a, b, what in zip(results[None], results[knob], ("loss", "d_hidden", "d_weight")):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=lambda m, w=what: f"{w}: {m}")


def test_bad_knob_value_is_an_error(monkeypatch):
    monkeypatch.setenv("COPSD_CPU_F32_GEMM", "fast")
    with pytest.raises(RuntimeError, match="COPSD_CPU_F32_GEMM must be auto, 1 or 0"):
        _C().f32_gemm_available()
    with pytest.raises(RuntimeError, match="COPSD_CPU_F32_GEMM"):
        cpu.f32_gemm_available()


_CALIBRATION = ("import json; from copsd.backends import cpu; "
                "print(json.dumps(dict(cpu.f32_gemm_calibration(), available=cpu.f32_gemm_available())))")


def _calibration(**env):
    return run_json(_CALIBRATION, drop=("COPSD_CPU_ISA", "COPSD_CPU_F32_GEMM"), **env)


@pytest.mark.parametrize("knob", [None, "auto", "AUTO", ""])
def test_default_follows_the_measurement(knob):
    """Unset, empty or `auto`: the kernel iff this process's measurement chose it; the measurement ran (on a CPU with
    the kernel), timed both GEMMs and found their products equal.  Which one wins is the machine's (not asserted)."""
    cal = _calibration(**({} if knob is None else {"COPSD_CPU_F32_GEMM": knob}))
    if cal["level"] == 0:
        assert not cal["measured"] and not cal["kernel"] and not cal["available"]
        return
    assert cal["measured"] and cal["agree"], cal
    assert cal["kernel_s"] > 0 and cal["mkl_s"] > 0, cal
    assert cal["kernel"] == (cal["kernel_s"] <= cal["mkl_s"] * cal["keep"]), cal
    assert cal["available"] == cal["kernel"], cal


_OP_GEMMS = ("import json, torch; from copsd import _C; from copsd.ops import linear_logprobs; "
             "_C.gemm_stats_reset(); linear_logprobs(torch.randn(64, 64), torch.randn(3000, 64), "
             "torch.zeros(64, dtype=torch.long), backend='cpu'); print(json.dumps(_C.gemm_stats()))")


@pytest.mark.parametrize("keep,kernel", [("0", False), ("1e9", True)])
def test_the_measurement_decides_the_ops(keep, kernel):
    """COPSD_CPU_F32_GEMM_KEEP = 0 (MKL wins every measurement) / 1e9 (the kernel does): the default then takes MKL's
    GEMM / the kernel, in f32_gemm_available() and in an op's own GEMMs; an explicit COPSD_CPU_F32_GEMM=1 still
    forces the kernel."""
    if _C().f32_gemm_level() == 0:
        pytest.skip("no fp32 kernel at this process's ISA level")
    cal = _calibration(COPSD_CPU_F32_GEMM_KEEP=keep)
    assert cal["measured"] and cal["keep"] == float(keep) and cal["kernel"] is kernel and cal["available"] is kernel
    for env, want in (({}, kernel), ({"COPSD_CPU_F32_GEMM": "1"}, True)):
        st = run_json(_OP_GEMMS, drop=("COPSD_CPU_F32_GEMM",), COPSD_CPU_F32_GEMM_KEEP=keep, **env)
        assert (st["f32_gemms"] > 0) is want, (env, st)


@pytest.mark.parametrize("bad", ["fast", "-1", "nan"])
def test_bad_keep_is_an_error(bad):
    out = subprocess.run([sys.executable, "-c", _CALIBRATION], capture_output=True, text=True,
                         env=dict(os.environ, COPSD_CPU_F32_GEMM_KEEP=bad, COPSD_CPU_F32_GEMM="auto"))
    assert out.returncode != 0 and "COPSD_CPU_F32_GEMM_KEEP must be a number >= 0" in out.stderr, out.stderr


def test_no_kernel_no_measurement():
    """Under COPSD_CPU_ISA=base there is no kernel: nothing is measured, MKL's GEMM runs."""
    cal = _calibration(COPSD_CPU_ISA="base")
    assert cal["level"] == 0 and not cal["measured"] and not cal["kernel"] and not cal["available"], cal


@pytest.mark.parametrize("kernel_s,mkl_s,agree,want", [
    (1.0, 1.0, True, True),      # a tie keeps the kernel
    (1.04, 1.0, True, True),     # within the 5 % margin
    (1.06, 1.0, True, False),    # MKL more than 5 % faster
    (0.5, 1.0, False, False),    # faster, but its product differed: never chosen
    (0.0, 1.0, True, False),     # no time measured
])
def test_the_rule(kernel_s, mkl_s, agree, want):
    assert _C().f32_calibration_pick(kernel_s, mkl_s, agree) is want
    assert _C().f32_calibration_pick(kernel_s, mkl_s, agree, keep=1.0) is (want and kernel_s <= mkl_s)


def test_public_availability_follows_the_knob(monkeypatch):
    """copsd.backends.cpu.f32_gemm_available() reads the knob now: off for 0 / false / off, on for 1 / on where the
    CPU has AVX2 or AVX-512, the default (the measurement's choice) for empty and `auto`."""
    level = _C().f32_gemm_level()
    monkeypatch.delenv("COPSD_CPU_F32_GEMM", raising=False)
    default = cpu.f32_gemm_available()
    assert default == _C().f32_gemm_available()
    assert not default or level > 0
    for value, want in (("0", False), ("false", False), ("OFF", False), ("1", level > 0), ("on", level > 0),
                        ("", default), ("auto", default)):
        monkeypatch.setenv("COPSD_CPU_F32_GEMM", value)
        assert cpu.f32_gemm_available() is want, value


@pytest.mark.parametrize("isa,cap", [("avx2", 1), ("base", 0), ("AVX2", 1), ("native", 2), ("avx512", 2)])
def test_isa_cap(isa, cap):
    """COPSD_CPU_ISA (read once per process) caps the kernel's level: AVX2's 16-row panels under avx2 on an AVX-512
    CPU, no kernel under base."""
    code = "from copsd import _C; print(_C.f32_gemm_level(), _C.f32_gemm_available())"

    def run(**env):
        base = {k: v for k, v in os.environ.items() if k != "COPSD_CPU_ISA"}
        out = subprocess.run([sys.executable, "-c", code], env=dict(base, COPSD_CPU_F32_GEMM="1", **env),
                             capture_output=True, text=True, check=True)
        return out.stdout.split()

    cpu_level = int(run()[0])  # this CPU's own level (this process's may be capped)
    level = min(cpu_level, cap)
    assert run(COPSD_CPU_ISA=isa) == [str(level), str(level > 0)]


@pytest.mark.parametrize("bad", ["avx-2", "sse4", "avx512f"])
def test_isa_cap_bad_value_is_an_error(bad):
    """A COPSD_CPU_ISA that names no level is an error naming the variable on the first op call, not "no cap"."""
    code = ("import torch; from copsd.ops import linear_logprobs; "
            "linear_logprobs(torch.randn(4, 8), torch.randn(40, 8), torch.zeros(4, dtype=torch.long), backend='cpu')")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, COPSD_CPU_ISA=bad),
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "COPSD_CPU_ISA must be base, avx2, avx512 or native" in out.stderr and repr(bad) in out.stderr
