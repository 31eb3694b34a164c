"""copsd's CPU ops with and without the packed lm_head (``COPSD_CPU_PACK=1`` / ``0``), side by side in one
process against the GEMM floor of ``bench_loss_cpu_peers.py`` (the full-size GEMMs alone).

Each round runs floor, copsd packed and copsd unpacked back to back (round-robin) and divides each time by
the same round's floor; the table gives the median time and the median of those same-round ratios.  Outputs of
both copsd variants are checked against the floor-free naive reference once (``bench_loss_cpu_peers.check``).
With ``--memory`` each variant's peak extra resident memory is measured in a fresh process.
``COPSD_CPU_PROFILE=1`` makes every op call print its logits-GEMM / epilogue / gradient-GEMM split.

Run: ``python benchmarks/bench_gemm_cpu.py [--n 2048 --h 256 --v 32000] [--dtype float32|bfloat16]
[--case rkl --case lpent --case ce --case topk ...] [--repeats 5] [--memory] [--no-check]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bench_loss_cpu_peers as peers  # noqa: E402
import common  # noqa: E402

# copsd's implementation of each case in bench_loss_cpu_peers (ce/lpent: the 3-GEMM linear_logprobs_loss too)
IMPLS = {"rkl": ["copsd"], "fkl": ["copsd"], "jsd": ["copsd"], "lpent": ["copsd", "copsd:loss"],
         "ce": ["copsd:loss"], "topk": ["copsd"]}


def make_variant(case, impl, pack, n, h, v, dtype="float32"):
    """``bench_loss_cpu_peers.make_case`` with COPSD_CPU_PACK set around each call (read per call)."""
    fn = peers.make_case(case, impl, n, h, v, dtype)

    def run():
        old = os.environ.get("COPSD_CPU_PACK")
        os.environ["COPSD_CPU_PACK"] = "1" if pack else "0"
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["COPSD_CPU_PACK"]
            else:
                os.environ["COPSD_CPU_PACK"] = old
    return run


def run_case(case, a):
    fns = {"floor": peers.make_case(case, "floor", a.n, a.h, a.v, a.dtype)}
    for impl in IMPLS[case]:
        for pack in (True, False):
            fns[f"{impl} pack={int(pack)}"] = make_variant(case, impl, pack, a.n, a.h, a.v, a.dtype)
    if a.check:
        ref = peers.make_case(case, "naive", a.n, a.h, a.v, a.dtype)()
        for name, fn in fns.items():
            peers.check(case, name.split()[0], fn(), ref, a.dtype)
        del ref
    times = {k: ts for k, (_, ts) in common.median_times_interleaved(fns, repeats=a.repeats, warmup=1).items()}
    rows = []
    for name in fns:
        ratios = [t / f for t, f in zip(times[name], times["floor"])]
        mem = float("nan")
        if a.memory and name != "floor":
            impl, pack = name.split()
            mem = common.cpu_peak_extra(os.path.abspath(__file__), "make_variant", case=case, impl=impl,
                                        pack=pack.endswith("1"), n=a.n, h=a.h, v=a.v, dtype=a.dtype) / common.MIB
        rows.append((case, name, statistics.median(times[name]) * 1e3, statistics.median(ratios), mem,
                     [f"{r:.2f}" for r in ratios]))
        print(f"  {case:6s} {name:18s} {rows[-1][2]:9.1f} ms  x{rows[-1][3]:.2f} floor  {mem:7.1f} MiB  "
              f"rounds {' '.join(rows[-1][5])}", flush=True)
    for impl in IMPLS[case]:  # packed / unpacked in the same round
        r = [a / b for a, b in zip(times[f"{impl} pack=1"], times[f"{impl} pack=0"])]
        print(f"  {case:6s} {impl} packed / unpacked, same round: median {statistics.median(r):.3f}  "
              f"rounds {' '.join(f'{x:.2f}' for x in r)}", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--h", type=int, default=256)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--dtype", choices=list(peers.DTYPES), default="float32")
    p.add_argument("--case", action="append", choices=list(IMPLS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory", action="store_true")
    p.add_argument("--no-check", dest="check", action="store_false")
    a = p.parse_args(argv)
    print(f"N={a.n} H={a.h} V={a.v} {a.dtype}; machine: {common.machine()}; load {os.getloadavg()}", flush=True)
    rows = []
    for case in a.case or ["rkl", "lpent", "ce", "topk"]:
        rows += run_case(case, a)
    print("\n| case | impl | median ms | x floor | peak extra MiB |\n|---|---|---:|---:|---:|")
    for case, name, ms, ratio, mem, _ in rows:
        print(f"| {case} | {name} | {ms:.0f} | {ratio:.2f} | {'' if mem != mem else f'{mem:.0f}'} |")


if __name__ == "__main__":
    main()
