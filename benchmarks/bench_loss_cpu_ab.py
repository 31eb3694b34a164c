"""A/B of copsd's CPU knobs in one process: the same op under environment variants that the C++ backend reads per
call (``COPSD_CPU_DYNAMIC``, ``COPSD_CPU_SIDE_GEMMS``, ``COPSD_CPU_GRAD_TILES``, ``COPSD_CPU_BF16_GEMM``...), timed
round-robin with the GEMM floor, so every round's ratios compare calls made seconds apart.  On a machine whose
speed drifts (a shared host) that is the only fair comparison: runs in separate processes, minutes apart, may
differ by more than the change being measured.

Each variant's output is checked against naive PyTorch before it is timed.  Printed per variant: the median of the
same-round ratios to the floor, the median of the same-round ratios to the first variant, and the median process
CPU time of a call (all threads).  ``--busy K`` times the rounds with K busy processes competing for the cores (as
``bench_loss_cpu_load.py``'s phases), so variants can be compared under a load in one process too.

Example (the dynamic tile hand-out against one fixed share per thread)::

    python benchmarks/bench_loss_cpu_ab.py --n 4096 --h 512 --v 32000 --case rkl --repeats 8 \\
        --variant default --variant COPSD_CPU_DYNAMIC=0
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_loss_cpu_peers as P  # noqa: E402
import common  # noqa: E402
from bench_loss_cpu_load import _busy, _stop  # noqa: E402


def parse_variant(text):
    """'default' -> {}; 'A=1,B=0' -> {'A': '1', 'B': '0'} (an empty value unsets the variable)."""
    if text == "default":
        return {}
    out = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--variant: expected 'default' or VAR=VALUE[,VAR=VALUE...], got {text!r}")
        out[name] = value
    return out


def _apply(env, names):
    """Set the variant's variables; unset those of the other variants that this one does not name."""
    for name in names:
        if env.get(name):
            os.environ[name] = env[name]
        else:
            os.environ.pop(name, None)


def run(case, n, h, v, dtype, impl, variants, repeats, log=print, busy=0):
    """Check and time ``impl`` under each variant (a list of (label, env) pairs) round-robin with the floor, with
    ``busy`` busy processes running during the timed rounds; returns one row per variant: median ms, median
    same-round ratio to the floor and to the first variant, median process CPU ms per call."""
    names = sorted({k for _, env in variants for k in env})
    fl = P.floor_of(case, impl)
    floor = P.make_case(case, fl, n, h, v, dtype)
    fn = P.make_case(case, impl, n, h, v, dtype)
    ref = P.make_case(case, "naive", n, h, v, dtype)()
    saved = {k: os.environ.get(k) for k in names}
    procs = []
    try:
        for label, env in variants:  # warm-up and check, per variant
            _apply(env, names)
            P.check(case, f"{impl} [{label}]", fn(), ref, dtype)
        del ref
        floor()
        times = {label: [] for label, _ in variants}
        cpu = {label: [] for label, _ in variants}
        floors = []
        if busy:
            procs = _busy(busy)
            time.sleep(1.0)
        for r in range(repeats):
            t0 = time.perf_counter()
            floor()
            floors.append(time.perf_counter() - t0)
            order = variants if r % 2 == 0 else variants[::-1]  # alternate who runs right after the floor
            for label, env in order:
                _apply(env, names)
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - t0)
                cpu[label].append(time.process_time() - c0)
            log(f"  round {r}: floor {floors[-1] * 1e3:.0f} ms, "
                + ", ".join(f"{label} x{times[label][-1] / floors[-1]:.3f}" for label, _ in variants))
    finally:
        _stop(procs)
        _apply({k: v for k, v in saved.items() if v is not None}, names)
    first = variants[0][0]
    rows = []
    for label, _ in variants:
        ts = times[label]
        rows.append(dict(variant=label, ms=statistics.median(ts) * 1e3,
                         floor=statistics.median(t / f for t, f in zip(ts, floors)),
                         vs_first=statistics.median(t / a for t, a in zip(ts, times[first])),
                         cpu_ms=statistics.median(cpu[label]) * 1e3, gemms=P.floor_gemms(case, fl)))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--h", type=int, default=256)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--case", choices=P.CASES, default="rkl")
    ap.add_argument("--impl", default="copsd", help="copsd, or a copsd variant of the peers benchmark (copsd:loss)")
    ap.add_argument("--variant", action="append", required=True,
                    help="'default' or VAR=VALUE[,VAR=VALUE...]; repeat for each variant (the first is the reference)")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--busy", type=int, default=0, help="busy processes running during the timed rounds")
    ap.add_argument("--out", help="append the markdown table to this file")
    a = ap.parse_args(argv)
    if not a.impl.startswith("copsd"):
        ap.error("--impl: a copsd implementation (the knobs are copsd's)")
    if len(a.variant) < 2:
        ap.error("--variant: give at least two")
    variants = [(text, parse_variant(text)) for text in a.variant]
    if a.busy < 0:
        ap.error("--busy: a number of processes >= 0")
    rows = run(a.case, a.n, a.h, a.v, a.dtype, a.impl, variants, a.repeats, busy=a.busy)
    lines = [f"N={a.n}, H={a.h}, V={a.v}, {a.dtype} inputs, {a.case} / {a.impl}; {a.repeats} round-robin rounds with "
             f"the floor ({rows[0]['gemms']} GEMMs), {a.busy} busy processes; ratios are medians of same-round "
             "ratios; CPU ms: median process CPU time per call.", "",
             f"Machine: {common.machine()}", "",
             "| variant | median ms | x floor | x first variant | CPU ms |", "|---|---:|---:|---:|---:|"]
    lines += [f"| `{r['variant']}` | {r['ms']:.0f} | {r['floor']:.3f} | {r['vs_first']:.3f} | {r['cpu_ms']:.0f} |"
              for r in rows]
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
