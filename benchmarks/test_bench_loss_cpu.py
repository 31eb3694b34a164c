"""pytest-benchmark version of bench_loss_cpu.py (same problems, same output checks), and the output checks of
bench_loss_cpu_peers.py: every implementation of every case against naive (the optional peers -- Liger-Kernel,
cut-cross-entropy, TRL, ``pip install -e .[bench]`` -- skipped when not installed), the floors' GEMMs, and the
commands of the matrix driver bench_loss_cpu_matrix.py.

Run: ``pytest benchmarks/test_bench_loss_cpu.py --benchmark-enable [--benchmark-only]``
(size from COPSD_BENCH_NVH="N,H,V", default 2048,256,32000).  With the project's default
``--benchmark-disable`` each case runs once and is still checked against naive PyTorch.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_loss_cpu as B  # noqa: E402

from copsd.backends import cpu  # noqa: E402

N, H, V = (int(x) for x in os.environ.get("COPSD_BENCH_NVH", "2048,256,32000").split(","))

pytestmark = pytest.mark.skipif(not cpu.available(), reason="copsd._C (C++ CPU extension) is not built")

_naive_cache = {}


def _checked(case, impl):
    """The case's callable, after checking its output against the naive implementation."""
    factory, kw, _ = B.CASES[case]
    fn = factory(impl=impl, n=N, h=H, v=V, **kw)
    if case not in _naive_cache:
        ref_impls = ("naive", "naive+lse") if case.startswith("top-k") else ("naive",)
        _naive_cache[case] = {i: factory(impl=i, n=N, h=H, v=V, **kw)() for i in ref_impls}
    outs = dict(_naive_cache[case])
    outs[impl] = fn()
    B.check(case, outs)
    return fn


@pytest.mark.parametrize("impl", ["naive", "cpu", "cpu:fused"])
@pytest.mark.parametrize("case", list(B.CASES))
def test_loss_cpu(benchmark, case, impl):
    if impl not in B.CASES[case][2]:
        pytest.skip(f"{case} has no {impl} variant")
    torch.manual_seed(0)
    fn = _checked(case, impl)
    benchmark.group = case
    benchmark.extra_info.update(N=N, H=H, V=V, threads=torch.get_num_threads())
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)


# ----------------------------------------------------------------------------- bench_loss_cpu_peers.py

import bench_loss_cpu_matrix as M  # noqa: E402
import bench_loss_cpu_peers as P  # noqa: E402

_peer_ref = {}


def _peer_naive(case, dtype):
    if (case, dtype) not in _peer_ref:
        _peer_ref[case, dtype] = P.make_case(case, "naive", N, H, V, dtype)()
    return _peer_ref[case, dtype]


def _peer(case, impl, dtype="float32"):
    try:
        return P.make_case(case, impl, N, H, V, dtype)
    except RuntimeError as e:
        if str(e).startswith("skip:"):
            pytest.skip(str(e))  # an optional peer that is not installed
        raise


@pytest.mark.parametrize("case,impl", [(c, i) for c in P.CASES for i in P.impls_for(c)
                                       if not i.startswith("floor") and i != "naive"])
def test_peer_matches_naive(case, impl):
    """Every implementation of the peers benchmark (copsd's and the installed peers) against naive."""
    out = _peer(case, impl)()
    P.check(case, impl, out, _peer_naive(case, "float32"), "float32")


@pytest.mark.parametrize("case,impl", [("rkl", "copsd"), ("jsd", "liger"), ("ce", "copsd:loss"),
                                       ("fkl", "copsd:bf16all"), ("lpent", "copsd:bf16all")])
def test_peer_matches_naive_bf16(case, impl):
    out = _peer(case, impl, "bfloat16")()
    P.check(case, impl, out, _peer_naive(case, "bfloat16"), "bfloat16")


@pytest.mark.parametrize("case,floor", [(c, f) for c in P.CASES for f in P.impls_for(c) if f.startswith("floor")])
def test_peer_floor_gemms(case, floor):
    """A floor runs exactly the GEMMs it is named after (the ratios' denominators): 4 for the divergences and
    ``floor4``, 3 for the log-probs cases' ``floor``, 1 for top-k."""
    fn = _peer(case, floor)
    out = fn()
    assert len(out) == fn.gemms == P.floor_gemms(case, floor)
    a, b, c, d = fn.operands
    z = a @ b.T
    torch.testing.assert_close(out[0], z)
    if fn.gemms == 4:
        torch.testing.assert_close(out[1], c @ d.T if case in P.DIV_KIND else z)
    if fn.gemms > 1:
        torch.testing.assert_close(out[-2], z @ b, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(out[-1], z.T @ a, rtol=1e-4, atol=1e-3)


def test_peer_floor_of_each_impl():
    """copsd's two-call log-probs path is held to the 4-GEMM floor, its loss-in-forward path to the 3-GEMM one."""
    assert P.floor_of("lpent", "copsd") == P.floor_of("ce", "copsd") == "floor4"
    assert P.floor_of("lpent", "copsd:loss") == P.floor_of("ce", "cce") == P.floor_of("rkl", "copsd") == "floor"


def test_peer_check_catches_mismatch():
    ref = (torch.tensor(1.0), torch.ones(3, 2))
    P.check("rkl", "copsd", (torch.tensor(1.0), torch.ones(3, 2)), ref, "float32")
    for bad in [(torch.tensor(1.01), torch.ones(3, 2)), (torch.tensor(1.0), torch.ones(2, 3)),
                (torch.tensor(float("nan")), torch.ones(3, 2)), (torch.tensor(1.0),)]:
        with pytest.raises(AssertionError):
            P.check("rkl", "copsd", bad, ref, "float32")


def _wrong_output(monkeypatch, bad_impl):
    """make_case with `bad_impl`'s loss off by 1 %."""
    real = P.make_case

    def make_case(case, impl, *args, **kw):
        fn = real(case, impl, *args, **kw)
        if impl != bad_impl:
            return fn

        def wrong():
            loss, *grads = fn()
            return (loss * 1.01, *grads)
        return wrong
    monkeypatch.setattr(P, "make_case", make_case)


def test_peer_with_a_wrong_output_is_reported_not_timed(monkeypatch):
    """A peer whose output fails the check is listed as a wrong output and left out of the timing; the case's other
    implementations are still checked and timed."""
    _wrong_output(monkeypatch, "chunked")
    rows = P.run_case("rkl", 64, 32, 1000, "float32", 1, False, only=["copsd", "chunked"])
    by = {r["impl"]: r for r in rows}
    assert by["chunked"]["skipped"].startswith("wrong output, not timed") and "ms" not in by["chunked"]
    assert by["copsd"]["ms"] > 0 and by["floor"]["ms"] > 0


def test_copsd_with_a_wrong_output_fails_the_run(monkeypatch):
    _wrong_output(monkeypatch, "copsd")
    with pytest.raises(AssertionError, match="rkl / copsd: output 0 differs"):
        P.run_case("rkl", 64, 32, 1000, "float32", 1, False, only=["copsd", "chunked"])


@pytest.mark.parametrize("cap,simdlen", [("avx2", "256"), ("", "None")])
def test_peers_pin_the_compiled_vector_width_in_an_avx2_process(cap, simdlen):
    """Under ATEN_CPU_CAPABILITY=avx2 (the matrix's avx2only runs) torch.compile's CPU vector width is pinned to 256
    bits (left to choose on an AVX-512 CPU it computed wrong results); elsewhere it is left alone."""
    import subprocess

    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
    code = "import bench_loss_cpu_peers, torch._inductor.config as c; print(c.cpp.simdlen)"
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(__file__)), env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] == simdlen


def test_matrix_commands(tmp_path, capsys):
    """The matrix driver: one fresh process per shape x dtype x ISA, the ISA in that process's environment, every
    implementation in the fp32 native run of the small shape and the short list elsewhere, the large shape's short
    case list, memory probes in the native runs of the small shape."""
    assert M.main(["--dry-run", "--out-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 8 and len({ln.split("--out ")[1].split()[0] for ln in lines}) == 8
    small = [ln for ln in lines if "--n 2048 --h 256 --v 32000" in ln]
    assert len(small) == 4 and sum("--dtype bfloat16" in ln for ln in small) == 2
    avx2 = [ln for ln in lines if ln.startswith("COPSD_CPU_ISA=avx2 ")]
    assert len(avx2) == 4
    full = [ln for ln in small if ln not in avx2 and "--dtype float32" in ln]
    assert len(full) == 1
    assert [ln for ln in lines if "--memory" in ln] == [ln for ln in small if ln not in avx2]
    assert all(("--impl" in ln) == (ln not in full) for ln in lines)
    assert all(("--case" in ln) == (ln not in small) for ln in lines)


# ----------------------------------------------------------------------------- bench_loss_cpu_load.py


def test_load_busy_processes_end():
    import bench_loss_cpu_load as L

    procs = L._busy(2)
    assert all(p.poll() is None for p in procs)
    L._stop(procs)
    assert all(p.returncode is not None for p in procs)


def test_load_table_slowdown_is_per_cycle():
    """slowdown = time under a load / time at the first load of the same cycle, median over cycles."""
    import bench_loss_cpu_load as L

    rows = [dict(cycle=c, load=ld, impl=i, ms=ms, ratio=ms / fl, loadavg=1.0, cpu_ms=2 * ms / k, share=1 / k)
            for c, scale in ((0, 1.0), (1, 2.0), (2, 1.5))
            for ld, k in ((0, 1.0), (2, 3.0))
            for i, ms, fl in (("floor", 100 * scale * k, 100 * scale * k), ("copsd", 150 * scale * k * (1 + ld / 4),
                                                                             100 * scale * k))]
    a = L.argparse.Namespace(case="rkl", n=1, h=1, v=1, dtype="float32", rounds=1, cycles=3, loads=[0, 2])
    md = L.table(dict(rows=rows, threads=2, machine="m"), a, "default")
    # busy, load avg, impl, median ms, x floor, slowdown, CPU ms (median over cycles), share
    assert "| 2 | 1.0 | floor | 450 | 1.00 | 3.00 | 300 | 0.33 |" in md
    assert "| 2 | 1.0 | copsd | 1012 | 2.25 | 4.50 | 675 | 0.33 |" in md
    assert "| 0 | 1.0 | copsd | 225 | 1.50 | 1.00 | 450 | 1.00 |" in md


# ----------------------------------------------------------------------------- bench_loss_cpu_ab.py


def test_ab_variant_parsing():
    import bench_loss_cpu_ab as AB

    assert AB.parse_variant("default") == {}
    assert AB.parse_variant("COPSD_CPU_DYNAMIC=0,COPSD_CPU_SIDE_GEMMS=") == {"COPSD_CPU_DYNAMIC": "0",
                                                                             "COPSD_CPU_SIDE_GEMMS": ""}
    for bad in ("COPSD_CPU_DYNAMIC", "=1", "A=1,B"):
        with pytest.raises(ValueError, match="--variant"):
            AB.parse_variant(bad)


def test_ab_checks_and_times_every_variant(monkeypatch):
    """Each variant's output is checked against naive under that variant's environment; every variant is timed in
    every round; the environment is restored afterwards."""
    import bench_loss_cpu_ab as AB

    monkeypatch.setenv("COPSD_CPU_DYNAMIC", "1")
    monkeypatch.delenv("COPSD_CPU_SIDE_GEMMS", raising=False)
    seen = []
    real = AB.P.check

    def check(case, impl, out, ref, dtype):
        seen.append((impl, os.environ.get("COPSD_CPU_DYNAMIC"), os.environ.get("COPSD_CPU_SIDE_GEMMS")))
        real(case, impl, out, ref, dtype)

    monkeypatch.setattr(AB.P, "check", check)
    variants = [("default", {}), ("both off", {"COPSD_CPU_DYNAMIC": "0", "COPSD_CPU_SIDE_GEMMS": "0"})]
    rows = AB.run("rkl", 64, 16, 1000, "float32", "copsd", variants, repeats=2, log=lambda *_: None)
    assert seen == [("copsd [default]", None, None), ("copsd [both off]", "0", "0")]
    assert [r["variant"] for r in rows] == ["default", "both off"]
    assert rows[0]["vs_first"] == 1.0 and all(r["floor"] > 0 and r["gemms"] == 4 for r in rows)
    assert os.environ.get("COPSD_CPU_DYNAMIC") == "1" and "COPSD_CPU_SIDE_GEMMS" not in os.environ


def test_ab_wrong_output_fails(monkeypatch):
    import bench_loss_cpu_ab as AB

    real = AB.P.make_case

    def make_case(case, impl, *args, **kw):
        fn = real(case, impl, *args, **kw)
        if impl != "copsd":
            return fn
        return lambda: tuple(t * 1.01 for t in fn())

    monkeypatch.setattr(AB.P, "make_case", make_case)
    with pytest.raises(AssertionError, match="differs from naive"):
        AB.run("rkl", 64, 16, 1000, "float32", "copsd", [("a", {}), ("b", {"COPSD_CPU_DYNAMIC": "0"})], repeats=1)
