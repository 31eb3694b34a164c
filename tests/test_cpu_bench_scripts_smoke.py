"""The CPU load and A/B benchmark scripts run end to end at tiny sizes (a Python error in them would otherwise
show only in a long benchmark run): every variant's output is checked against naive inside the scripts, and the
tables they print carry the columns that RESULTS.md quotes (CPU time and share under a load)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n", "40", "--h", "24", "--v", "301"]


def _run(args):
    pytest.importorskip("copsd._C")
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=e, timeout=600, cwd=ROOT)


def test_bench_loss_cpu_ab_under_a_busy_process(tmp_path):
    out = tmp_path / "ab.md"
    r = _run(["benchmarks/bench_loss_cpu_ab.py", *TINY, "--case", "rkl", "--repeats", "1", "--busy", "1",
              "--variant", "default", "--variant", "COPSD_CPU_DYNAMIC=0", "--out", str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = out.read_text()
    assert "1 busy processes" in text and "| CPU ms |" in text
    assert "| `COPSD_CPU_DYNAMIC=0` |" in text


@pytest.mark.parametrize("case,floors", [("rkl", {"floor"}), ("lpent", {"floor", "floor4"})])
def test_bench_loss_cpu_load_tiny(tmp_path, case, floors):
    """Also a case whose copsd row is taken to the 4-GEMM floor (log-probs + entropy), which --impl does not name:
    the script times it too (it once failed there with a KeyError)."""
    out = tmp_path / "load.md"
    r = _run(["benchmarks/bench_loss_cpu_load.py", *TINY, "--case", case, "--impl", "floor", "naive", "copsd",
              "--loads", "0", "1",
              "--cycles", "1", "--rounds", "1", "--settle", "0.1", "--env", "default", "--out", str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = out.read_text()
    assert "| busy processes | load avg | impl | median ms | x floor | slowdown | CPU ms | share |" in text
    rows = [line for line in text.splitlines() if line.startswith("| 1 |")]
    assert {line.split("|")[3].strip() for line in rows} == floors | {"naive", "copsd"}
