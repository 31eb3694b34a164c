"""CPU loss ops on a loaded machine: how much copsd slows down when other processes compete for the cores,
against torch's own ops (the GEMM floor: MKL alone; naive PyTorch; the compiled 256-row chunked loop).

Phases alternate ``--loads`` (default 0, 2, 4 busy processes, each a Python busy loop at this process's own
niceness), ``--cycles`` times (0, 2, 4, 0, 2, 4, ...), so that a drift in the load of the rest of the machine
hits every phase alike.  In each phase the implementations run round-robin for ``--rounds`` rounds (the
``bench_loss_cpu_peers.py`` cases, outputs checked against naive once before timing).  Reported per phase and
implementation: the median time, the median same-round ratio to the floor, and the slowdown = median time under
the load / median time at load 0 of the same cycle.  copsd is as robust as torch when its slowdown is no larger
than the floor's and naive's.  Also per call: the process CPU time (all threads, ``time.process_time``) and its
share of the torch threads' wall time (CPU ms / (threads x wall ms)).  Under a load of k busy processes a fair
scheduler gives the t threads about t / (t + k) of the cores; a share below that means the op's threads left
cores idle or waited for each other, a CPU time above the idle one means the same work cost more CPU.

OpenMP settings are read when the runtime starts, so variants of them run as separate processes: ``--env
"OMP_WAIT_POLICY=PASSIVE" --env "GOMP_SPINCOUNT=0"`` runs the whole measurement once per variant (``default`` is
the inherited environment) in fresh child processes and prints one table each.

Run: ``python benchmarks/bench_loss_cpu_load.py [--case rkl] [--loads 0 2 4] [--cycles 2] [--rounds 3]
[--env default --env OMP_WAIT_POLICY=PASSIVE] [--out FILE.md]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

IMPLS = ("floor", "naive", "chunked+compile", "copsd")


BUSY = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass\n"  # spins; ends with its parent


def _busy(k):
    """``k`` spinning Python processes (children of this one, same niceness; each exits if this one dies)."""
    return [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(k)]


def _stop(procs):
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def measure(a):
    """One process's whole measurement; returns the rows (one per cycle, load and implementation)."""
    import bench_loss_cpu_peers as P
    import common
    import torch

    impls = [i for i in a.impl if i in P.impls_for(a.case)]
    if "floor" not in impls:
        impls.insert(0, "floor")
    for fl in dict.fromkeys(P.floor_of(a.case, i) for i in list(impls)):  # the floor each ratio is taken to
        if fl not in impls:  # (copsd's log-prob paths: the 4-GEMM floor, which --impl may not name)
            impls.insert(1, fl)
    fns = {i: P.make_case(a.case, i, a.n, a.h, a.v, a.dtype) for i in dict.fromkeys(["naive"] + impls)}
    ref = fns["naive"]()
    for i in impls:
        P.check(a.case, i, fns[i](), ref, a.dtype)  # also the warm-up (compilation)
    del ref
    cpu = {i: [] for i in impls}  # process CPU seconds per call, in call order (as median_times_interleaved's)

    def cpu_timed(i, fn):
        def run():
            c0 = time.process_time()
            out = fn()
            cpu[i].append(time.process_time() - c0)
            return out
        return run

    fns = {i: cpu_timed(i, fns[i]) for i in impls}
    threads = torch.get_num_threads()
    rows = []
    for cycle in range(a.cycles):
        for load in a.loads:
            procs = _busy(load)
            try:
                time.sleep(a.settle)
                la = os.getloadavg()[0]
                for i in impls:
                    cpu[i].clear()
                times = {i: ts for i, (_, ts) in common.median_times_interleaved(fns, repeats=a.rounds,
                                                                                 warmup=0).items()}
            finally:
                _stop(procs)
            for i in impls:
                fl = P.floor_of(a.case, i)
                rows.append(dict(cycle=cycle, load=load, impl=i, ms=statistics.median(times[i]) * 1e3,
                                 ratio=statistics.median(t / f for t, f in zip(times[i], times[fl])), loadavg=la,
                                 cpu_ms=statistics.median(cpu[i]) * 1e3,
                                 share=statistics.median(c / (threads * t) for c, t in zip(cpu[i], times[i]))))
                print(f"  cycle {cycle} load {load} ({la:.1f}) {i:16s} {rows[-1]['ms']:9.1f} ms  "
                      f"x{rows[-1]['ratio']:.2f} floor  CPU {rows[-1]['cpu_ms']:.0f} ms "
                      f"(share {rows[-1]['share']:.2f})", flush=True)
    return dict(rows=rows, threads=threads, machine=common.machine())


def table(res, a, env_name):
    rows = res["rows"]
    idle = {(r["cycle"], r["impl"]): r["ms"] for r in rows if r["load"] == a.loads[0]}
    lines = [f"Case {a.case}, N={a.n}, H={a.h}, V={a.v}, {a.dtype}, env `{env_name}`, torch threads {res['threads']}; "
             f"{a.rounds} round-robin rounds per phase, {a.cycles} cycles of loads {a.loads}. `x floor`: median "
             f"same-round ratio; `slowdown`: median over cycles of (time under the load / time at load "
             f"{a.loads[0]} of the same cycle); `CPU ms`: median process CPU time per call; `share`: median of CPU "
             f"time / (threads x wall time).", "", f"Machine: {res['machine']}", "",
             "| busy processes | load avg | impl | median ms | x floor | slowdown | CPU ms | share |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    for load in a.loads:
        sel = [r for r in rows if r["load"] == load]
        la = statistics.median(r["loadavg"] for r in sel)
        for i in impls:
            ri = [r for r in sel if r["impl"] == i]
            slow = statistics.median(r["ms"] / idle[(r["cycle"], i)] for r in ri)
            lines.append(f"| {load} | {la:.1f} | {i} | {statistics.median(r['ms'] for r in ri):.0f} "
                         f"| {statistics.median(r['ratio'] for r in ri):.2f} | {slow:.2f} "
                         f"| {statistics.median(r['cpu_ms'] for r in ri):.0f} "
                         f"| {statistics.median(r['share'] for r in ri):.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="rkl", choices=("rkl", "fkl", "jsd", "lpent", "ce", "topk"))
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--h", type=int, default=256)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--impl", nargs="*", default=list(IMPLS))
    p.add_argument("--loads", type=int, nargs="*", default=[0, 2, 4], help="busy processes per phase")
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds per phase")
    p.add_argument("--settle", type=float, default=1.0, help="seconds between starting the load and timing")
    p.add_argument("--env", action="append",
                   help="run once per variant in a fresh process: 'default' or VAR=VALUE[,VAR=VALUE...]")
    p.add_argument("--json", help=argparse.SUPPRESS)  # child mode: write the measurement here
    p.add_argument("--out", help="append the markdown tables to this file")
    a = p.parse_args(argv)
    if a.json:
        res = measure(a)
        with open(a.json, "w") as f:
            json.dump(res, f)
        return 0
    tables = []
    for variant in a.env or ["default"]:
        env = dict(os.environ)
        if variant != "default":
            env.update(kv.split("=", 1) for kv in variant.split(","))
        fd, out = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        args = [x for x in (argv if argv is not None else sys.argv[1:])]
        # the child gets the same options without --env / --out
        child, skip = [], False
        for x in args:
            if skip:
                skip = False
                continue
            if x in ("--env", "--out"):
                skip = True
                continue
            if x.startswith(("--env=", "--out=")):
                continue
            child.append(x)
        print(f"== env {variant}", flush=True)
        subprocess.run([sys.executable, os.path.abspath(__file__), *child, "--json", out], env=env, check=True)
        with open(out) as f:
            res = json.load(f)
        os.remove(out)
        tables.append(table(res, a, variant))
        print(tables[-1], flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n\n".join(tables) + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
