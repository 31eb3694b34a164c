"""pytest-benchmark version of bench_loss_cpu.py (same problems, same output checks).

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
