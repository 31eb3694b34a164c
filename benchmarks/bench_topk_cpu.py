"""``linear_topk`` on the CPU backend against its floor, side by side in one process.

Per k, round-robin over ``--repeats`` rounds:
  floor    the one logits GEMM alone (fp32 inputs, preallocated output): nothing that reads every logit is faster
  copsd    ``copsd.ops.linear_topk(..., backend="cpu")``; with ``COPSD_CPU_PROFILE=1`` set by this script for
           its calls, the C++ driver's own split (tile GEMMs incl. the packing vs the top-k scan) is read back;
           the tiled driver measures it per thread (summed over the threads / their number), so on a busy
           machine the two parts can add up to less than the call's wall time
  torch    the same GEMM followed by ``log_softmax`` + ``torch.topk`` (what a user writes)
Each round's time is divided by the same round's floor; the table reports the medians.  Every copsd answer is
checked against ``torch.topk`` of the float64 logits (values to 1e-4, ids as sets up to ties) before timing.

Run: ``python benchmarks/bench_topk_cpu.py [--n 2048 --h 256 --v 32000] [--k 1 8 64 256]
[--dtype float32|bfloat16] [--repeats 5]``.  ``COPSD_CPU_ISA=avx2`` (or ``base``) caps the instruction set of
copsd's row kernels.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from copsd import ops  # noqa: E402
from copsd.backends import cpu  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROFILE = re.compile(r"\[copsd cpu\] topk: logits GEMM ([\d.]+) ms, epilogue ([\d.]+) ms")


def _copsd_profiled(x, w, k):
    """One copsd call with the C++ profile on; returns (seconds, gemm ms, epilogue ms)."""
    os.environ["COPSD_CPU_PROFILE"] = "1"
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as f:
        os.dup2(f.fileno(), 2)
        try:
            t0 = time.perf_counter()
            ops.linear_topk(x, w, k, backend="cpu")
            dt = time.perf_counter() - t0
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.environ.pop("COPSD_CPU_PROFILE", None)
        f.seek(0)
        text = f.read().decode(errors="replace")
    m = PROFILE.findall(text)
    gemm = sum(float(a) for a, _ in m)
    epi = sum(float(b) for _, b in m)
    return dt, gemm, epi


def check(x, w, k):
    ids, lp, lse = ops.linear_topk(x, w, k, backend="cpu")
    z = x.double() @ w.double().T
    ls = z.log_softmax(-1)
    want = ls.topk(k, dim=1).values
    err = (lp.double() - want).abs().max().item()
    assert err <= 1e-4 * (1 + want.abs().max().item()), f"top-k log-probs off by {err}"
    got_true = ls.gather(1, ids)
    assert (got_true - want).abs().max().item() <= 1e-4 * (1 + want.abs().max().item()), "ids off"
    assert all(len(set(r.tolist())) == k for r in ids[:64]), "repeated ids"


def run(n, h, v, k, dtype, repeats):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, generator=g).to(dtype)
    w = (torch.randn(v, h, generator=g) / h**0.5 * 2).to(dtype)
    x32, w32 = x.float(), w.float()
    out = torch.empty(n, v)
    check(x, w, k)

    def floor():
        torch.mm(x32, w32.T, out=out)

    def naive():
        torch.mm(x32, w32.T, out=out)
        out.log_softmax(-1).topk(k, dim=1)

    floor(), naive(), _copsd_profiled(x, w, k)  # warm-up (workspace, MKL, thread pools)
    t = {"floor": [], "copsd": [], "torch": []}
    split = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        floor()
        t["floor"].append(time.perf_counter() - t0)
        dt, gemm, epi = _copsd_profiled(x, w, k)
        t["copsd"].append(dt)
        split.append((gemm, epi))
        t0 = time.perf_counter()
        naive()
        t["torch"].append(time.perf_counter() - t0)
    ratio = {name: statistics.median(a / f for a, f in zip(ts, t["floor"])) for name, ts in t.items()}
    ms = {name: 1e3 * statistics.median(ts) for name, ts in t.items()}
    gemm = statistics.median(s[0] for s in split)
    epi = statistics.median(s[1] for s in split)
    return ms, ratio, gemm, epi


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--h", type=int, default=256)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--k", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    print(f"N={a.n} H={a.h} V={a.v} {a.dtype}, isa={cpu.isa()}, threads={torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| k | floor ms | copsd ms (x floor) | copsd GEMM ms | copsd epilogue ms | GEMM + torch.topk ms (x floor) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for k in a.k:
        ms, r, gemm, epi = run(a.n, a.h, a.v, k, DTYPES[a.dtype], a.repeats)
        print(f"| {k} | {ms['floor']:.1f} | {ms['copsd']:.1f} ({r['copsd']:.2f}x) | {gemm:.1f} | {epi:.1f} | "
              f"{ms['torch']:.1f} ({r['torch']:.2f}x) |", flush=True)


if __name__ == "__main__":
    main()
