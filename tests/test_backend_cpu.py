"""The C++ CPU backend (copsd._C) as a whole: every dispatch level of its row epilogues, and a Qwen-sized
vocabulary across its ops.

The per-op tests of this backend are in ``test_linear_divergence.py``, ``test_linear_logprobs.py``,
``test_linear_topk.py`` and ``test_logprobs_loss.py`` (dense float64 ground truth from ``copsd.reference``,
float32 by the error-relative criterion of ``tests/criteria.py``).  The tests marked ``isa`` there and here
also run once per lower CPU dispatch level (``COPSD_CPU_ISA=base|avx2``) in a subprocess: see
``test_cpu_dispatch_level`` at the end.
"""

import os
import re
import subprocess
import sys

import pytest
import torch
from oplib import check_accurate, check_div, check_topk, cpu_inputs, dense, random_ids

from copsd.backends import cpu
from copsd.ops._spec import DivergenceSpec, LogitSpec

pytestmark = pytest.mark.skipif(not cpu.available(), reason="copsd._C (C++ CPU extension) is not built")

# The files whose isa-marked tests test_cpu_dispatch_level reruns at each lower dispatch level.
ISA_TEST_FILES = ("tests/test_backend_cpu.py", "tests/test_linear_divergence.py", "tests/test_linear_logprobs.py",
                  "tests/test_linear_topk.py", "tests/test_logprobs_loss.py")


@pytest.fixture(autouse=True)
def small_workspace(monkeypatch):
    """~5 rows per chunk at the test vocabularies, so the row-chunk loop runs many times."""
    monkeypatch.setattr(cpu, "WORKSPACE_BYTES", 5 * 2 * 211 * 8)


# ----------------------------------------------------------------------------- a Qwen-sized vocabulary


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
    xs, ws, xt, wt = cpu_inputs(N, H, V, torch.float32)
    K = random_ids(N, V, 16, seed=7)
    tg = torch.rand(N)
    if what == "logprobs_topk":
        ids = K[:, 0].contiguous()
        got = cpu.logprobs_forward(xs, ws, ids, LogitSpec())
        check_accurate(got, dense.logprobs(xs.double(), ws.double(), ids), dense.logprobs(xs, ws, ids),
                       ("logprobs", "entropy", "lse"), torch.float32)
        ids, lp, lse = cpu.topk(xs, ws, 64, LogitSpec())
        check_topk(ids, lp, lse, xs.double() @ ws.double().T, 64, xs @ ws.T)
        return
    for support in ("full", "teacher_topk"):
        div = DivergenceSpec(kind=what, support=support)
        got = cpu.divergence(xs, ws, xt, wt, LogitSpec(), div, K, tg)
        check_div(got, xs, ws, xt, wt, LogitSpec(), div, K, tg, f"{support} ")


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
           "-k", "not triton and not reference", *ISA_TEST_FILES]
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    tail = res.stdout[-4000:] + res.stderr[-2000:]
    assert res.returncode == 0, f"COPSD_CPU_ISA={level}:\n{tail}"
    passed = re.search(r"(\d+) passed", res.stdout)
    assert passed and int(passed.group(1)) >= 100, f"COPSD_CPU_ISA={level}: too few tests ran\n{tail}"
