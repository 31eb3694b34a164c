"""The GPU benchmark scripts run their checks on CPU at tiny sizes, so a lent GPU's minutes are not lost to a
Python error in them: ``bench_loss_gpu.py --smoke-cpu`` runs its correctness section (both Triton paths, every
op it times, against the reference backend) in the Triton interpreter; ``bench_prefix_gpu.py --tiny`` runs its
whole flow (naive, reuse, floor, output checks) on a tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, **env):
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **env)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=e, timeout=900, cwd=ROOT)


@pytest.mark.slow  # every Triton op of the benchmark in the interpreter: ~1.5 min on 2 cores
def test_bench_loss_gpu_checks_pass_on_cpu():
    pytest.importorskip("triton")
    r = _run(["benchmarks/bench_loss_gpu.py", "--smoke-cpu"], TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "smoke-cpu correctness: ok" in r.stdout
    for name in ("[fused] logprobs_loss d_weight", "[chunked] logprobs_loss d_weight", "[chunked] topk set"):
        assert name in r.stdout


def test_bench_prefix_gpu_tiny_runs_and_checks():
    r = _run(["benchmarks/bench_prefix_gpu.py", "--tiny"], CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "output check PASSED" in r.stdout


def test_bench_attention_gpu_cpu_smoke(tmp_path):
    """``bench_attention_gpu.py --cpu-smoke``: tiny shapes on CPU, every output checked against the dense
    float64 reference, the JSON result written."""
    r = _run(["benchmarks/bench_attention_gpu.py", "--cpu-smoke", "--out", str(tmp_path)], CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "checked against the dense float64 reference: OK" in r.stdout
    result = json.loads((tmp_path / "bench_attention_gpu.json").read_text())
    assert len(result["cases"]) == 2 and not result["failures"]
