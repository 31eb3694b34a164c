"""The C++ backend's thread team (csrc/cpu/team.h): one OpenMP region per divergence call whose threads go through
the chunks' phases together and sleep at the team's own barriers instead of spinning in libgomp's.

Here: the barrier itself (every task of every phase runs once, after the whole previous phase; a task's exception
reaches the caller and no thread is left waiting, also with more threads than cores), and the divergence on the team
(``COPSD_CPU_TEAM``, on by default where a chunk's every phase is single-threaded tasks) against the same call run as
separate OpenMP regions (``COPSD_CPU_TEAM=0``): the same tasks, so the same bits, for every kind, top-k support,
token statistics, bf16 inputs and without gradients; and against float64."""

import os
import subprocess
import sys

import criteria
import dense
import pytest
import torch
from oplib import cpu_inputs

from copsd.backends import cpu
from copsd.ops._spec import DivergenceSpec, LogitSpec

pytestmark = pytest.mark.skipif(not cpu.available(), reason="copsd._C (C++ CPU extension) is not built")

LOGIT = LogitSpec(temperature=1.3, logit_scale=0.9)


def _C():
    from copsd import _C
    return _C


def _expected_cells(phases, n):
    cells, prev = [], 0
    for _ in range(phases):
        row = [(prev + i + 1) % 1000003 for i in range(n)]
        cells += row
        prev = sum(row) % 1000003
    return cells


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("phases,n", [(1, 1), (5, 1), (40, 7), (12, 300), (3, 0)])
def test_team_phases(threads, phases, n):
    """Each task of phase p adds the sum of phase p - 1's cells (plus i + 1, mod 1000003) to its own cell (0 before):
    a task run before the previous phase was complete, twice or never leaves a wrong cell; with more threads than
    the machine's cores the waiting threads sleep on the futex (the spin runs out) and are woken."""
    size, cells = _C().team_check(threads, phases, n)
    assert 1 <= size <= threads
    assert cells == _expected_cells(phases, n)


def test_team_exception_reaches_the_caller():
    """A task that throws: the other tasks of the call are skipped, every thread still meets at every barrier (no
    one is left waiting), and the first exception is raised to the caller; the next call runs normally.  In a
    subprocess with a timeout, so that a deadlock fails the test instead of hanging the suite."""
    code = ("from copsd import _C\n"
            "for threads in (1, 2, 4):\n"
            "    try:\n"
            "        _C.team_check(threads, 6, 50, 2)\n"
            "        raise SystemExit('no exception')\n"
            "    except RuntimeError as e:\n"
            "        assert 'task 25 of phase 2 threw' in str(e), e\n"
            "    assert _C.team_check(threads, 3, 4)[1][-1] > 0\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def _inputs(n, v, h, dtype, seed):
    return cpu_inputs(n, h, v, dtype, scale=1.5, seed=seed, dominant=5)  # row 5: a dominant vocabulary row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind,support,stats,grad", [
    ("reverse_kl", "full", False, True), ("forward_kl", "full", True, True), ("jsd", "full", False, True),
    ("reverse_kl", "teacher_topk", False, True), ("jsd", "teacher_topk", True, True),
    ("reverse_kl", "full", True, False)])
def test_divergence_on_the_team(monkeypatch, dtype, kind, support, stats, grad):
    """Two threads, chunks of 300 + 300 + 57 rows with gradients (without: 128-row chunks, which a packed head caps
    them to), a vocabulary of 5003 in tiles of 1536 (4096 without gradients) and a short last one, H = 64 (the
    gradient products on copsd's fp32 kernel where the CPU has AVX-512): the call runs on the team (counted) and
    gives the same loss, gradients and statistics, bit for bit, as with COPSD_CPU_TEAM=0 (separate regions; not
    counted); both within the float64 criterion."""
    if not (_C().f32_gemm_available() or _C().packed_gemm_available()):
        pytest.skip("no packed fp32 GEMM here (no AVX-512 and no MKL packed-GEMM API): the heads are not tiled")
    n, v, h, rows = 657, 5003, 64, 300
    xs, ws, xt, wt = _inputs(n, v, h, dtype, seed=31)
    g = torch.Generator().manual_seed(32)
    tg = torch.rand(n, generator=g, dtype=torch.float64) if grad else None
    topk = torch.rand(n, v, generator=g).topk(9, dim=1).indices if support == "teacher_topk" else None
    sid = torch.randint(0, v, (n,), generator=g)
    div = DivergenceSpec(kind=kind, beta=0.3, support=support, tail="bucket")
    elem = 8 if dtype == torch.float64 else 4
    chunks = 3 if grad or dtype == torch.float64 else 6  # an fp64 head is not packed: its chunks stay at 300 rows
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(cpu, "WORKSPACE_BYTES", rows * 2 * v * elem)
        for var in ("COPSD_CPU_PACK", "COPSD_CPU_PACK_MB", "COPSD_CPU_SIDE_GEMMS", "COPSD_CPU_DYNAMIC",
                    "COPSD_CPU_GRAD_TILES"):
            monkeypatch.delenv(var, raising=False)
        out = {}
        for team in ("1", "0"):
            monkeypatch.setenv("COPSD_CPU_TEAM", team)
            _C().gemm_stats_reset()
            tgc = None if tg is None else tg.to(torch.float64 if elem == 8 else torch.float32)
            out[team] = cpu.divergence_stats(xs, ws, xt, wt, LOGIT, div, topk, tgc, sid) if stats else \
                cpu.divergence(xs, ws, xt, wt, LOGIT, div, topk, tgc)
            st = _C().gemm_stats()
            assert st["team_calls"] == (1 if team == "1" else 0), st
            assert st["side_tile_chunks"] == st["side_chunks"] == chunks, st
    finally:
        torch.set_num_threads(old)
    for a, b, what in zip(out["1"], out["0"], ("loss", "d_hidden", "d_weight", "stats")):
        if b is None:
            assert a is None, what
        else:
            assert torch.equal(a, b), (what, (a.double() - b.double()).abs().max().item())
    if grad:
        exact = dense.divergence_grads(xs, ws, xt, wt, LOGIT, div, topk, tg)
        plain = dense.divergence_grads(xs, ws, xt, wt, LOGIT, div, topk, tg, dtype=torch.float32)
        for got, e, p, what in zip(out["1"][:3], exact, plain, ("loss", "d_hidden", "d_weight")):
            if dtype == torch.float64:
                torch.testing.assert_close(got.double(), e.double(), rtol=1e-9, atol=1e-11)
            else:
                criteria.assert_accurate(got, e, p, what, dtype=torch.float32, scale=5.0 if what == "loss" else 1.0)


@pytest.mark.parametrize("value,on", [(None, True), ("1", True), ("on", True), ("0", False), ("false", False)])
def test_team_knob(monkeypatch, value, on):
    """COPSD_CPU_TEAM takes the on/off spellings of every knob (read per call); a bad value is an error naming it."""
    if not (_C().f32_gemm_available() or _C().packed_gemm_available()):
        pytest.skip("no packed fp32 GEMM here (no AVX-512 and no MKL packed-GEMM API): the heads are not tiled")
    xs, ws, xt, wt = _inputs(300, 2053, 64, torch.float32, seed=33)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(cpu, "WORKSPACE_BYTES", 300 * 2 * 2053 * 4)
        if value is None:
            monkeypatch.delenv("COPSD_CPU_TEAM", raising=False)
        else:
            monkeypatch.setenv("COPSD_CPU_TEAM", value)
        _C().gemm_stats_reset()
        cpu.divergence(xs, ws, xt, wt, LOGIT, DivergenceSpec(), None, torch.ones(300))
        assert _C().gemm_stats()["team_calls"] == int(on)
        monkeypatch.setenv("COPSD_CPU_TEAM", "maybe")
        with pytest.raises(RuntimeError, match="COPSD_CPU_TEAM must be 0 or 1"):
            cpu.divergence(xs, ws, xt, wt, LOGIT, DivergenceSpec(), None, torch.ones(300))
    finally:
        torch.set_num_threads(old)


def test_team_under_cpu_isa_levels():
    """The team's barrier and the divergence on it at every lower dispatch level (a fresh process each: the level is
    read once), so the AVX2 and plain builds of the row kernels and GEMMs run inside it too."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for level in ("avx2", "base"):
        env = dict(os.environ, COPSD_CPU_ISA=level, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                              "-k", "team_phases or (divergence_on_the_team and float32)"],
                             capture_output=True, text=True, env=env, cwd=os.path.dirname(__file__), timeout=900)
        assert out.returncode == 0, f"COPSD_CPU_ISA={level}:\n{out.stdout[-3000:]}"
