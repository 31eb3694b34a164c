"""The CPU loss ops against their peers over the matrix of issue 17, one command: every shape x input dtype x
copsd epilogue ISA runs ``bench_loss_cpu_peers.py`` in its own fresh process (the ISA is chosen when the
extension loads, so ``COPSD_CPU_ISA`` must be set before the process starts), with same-round ratios to the GEMM
floors and, where asked, per-implementation peak memory in further fresh processes.  One markdown table per
configuration is written to ``--out-dir`` (``<N>x<H>x<V>_<dtype>_<isa>.md``) and all of them, with each
configuration's wall time and the load average before and after it, to ``--out-dir/matrix.md``.

Default matrix: N=2048 H=256 V=32000 and N=4096 H=512 V=32000; float32 and bfloat16; ``COPSD_CPU_ISA=avx2`` and
native (the best the CPU has).  The peak memory does not depend on the epilogue ISA, so by default it is probed
in the native runs only (``--memory all|native|none``).  To keep the whole matrix near 15 minutes on an idle
2-core machine the defaults trade completeness for time: ``--repeats 2`` timed rounds after the checked warm-up;
the full set of implementations at the small shape, and at the large shape (8x the GEMM work) only the floors,
copsd and the fastest peers (``--large-impl``, naive still runs once there as the reference of the checks);
memory probes only at the small shape (``--memory-shapes``).  ``--dry-run`` prints the commands.

Run: ``python benchmarks/bench_loss_cpu_matrix.py [--repeats 2] [--out-dir DIR]``; a subset with e.g.
``--shape 2048,256,32000 --dtype float32 --isa native --case rkl``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = os.path.join(HERE, "bench_loss_cpu_peers.py")
SHAPES = ("2048,256,32000", "4096,512,32000")
DTYPES = ("float32", "bfloat16")
ISAS = ("avx2", "native")
# The peers that were within ~1.5x of copsd in earlier runs (the eager chunked loop and TRL on materialised logits
# were 2-4x the floor throughout): what the large shape times by default.
LARGE_IMPLS = ("copsd", "copsd:loss", "chunked+compile", "liger", "cce")


def _load():
    try:
        return "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    except OSError:
        return "n/a"


def configs(a):
    for shape in a.shape or SHAPES:
        for dtype in a.dtype or DTYPES:
            for isa in a.isa or ISAS:
                yield shape, dtype, isa


def command(a, shape, dtype, isa):
    n, h, v = (int(x) for x in shape.split(","))
    out = os.path.join(a.out_dir, f"{n}x{h}x{v}_{dtype}_{isa}.md")
    cmd = [sys.executable, PEERS, "--n", str(n), "--h", str(h), "--v", str(v), "--dtype", dtype,
           "--repeats", str(a.repeats), "--out", out]
    for c in a.case or ():
        cmd += ["--case", c]
    impls = a.impl or (a.large_impl if shape not in a.full_shapes else None)
    for i in impls or ():
        cmd += ["--impl", i]
    if a.memory == "all" or (a.memory == "native" and isa == "native"):
        if shape in a.memory_shapes:
            cmd.append("--memory")
    env = dict(os.environ)
    env.pop("COPSD_CPU_ISA", None)
    if isa != "native":
        env["COPSD_CPU_ISA"] = isa
    return cmd, env, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M")
    p.add_argument("--shape", action="append", help=f"N,H,V (repeatable; default {' and '.join(SHAPES)})")
    p.add_argument("--dtype", action="append", choices=DTYPES, help="input dtype (repeatable; default both)")
    p.add_argument("--isa", action="append", choices=("base", "avx2", "avx512", "native"),
                   help="COPSD_CPU_ISA of the run (repeatable; default avx2 and native)")
    p.add_argument("--case", action="append", help="only these cases (see bench_loss_cpu_peers.py)")
    p.add_argument("--impl", action="append", help="time only these implementations at every shape")
    p.add_argument("--large-impl", nargs="*", default=list(LARGE_IMPLS),
                   help="implementations timed at the shapes not in --full-shapes (default: %(default)s)")
    p.add_argument("--full-shapes", nargs="*", default=[SHAPES[0]],
                   help="shapes that time every implementation (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="timed round-robin rounds per configuration")
    p.add_argument("--memory", choices=("all", "native", "none"), default="native",
                   help="peak-memory probes (fresh processes) in every run, the native-ISA runs, or none")
    p.add_argument("--memory-shapes", nargs="*", default=[SHAPES[0]],
                   help="shapes whose runs probe memory (default: %(default)s)")
    p.add_argument("--out-dir", default=os.path.join(HERE, "raw", f"cpu_matrix_{stamp}"))
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    a = p.parse_args(argv)
    runs = [(cfg, *command(a, *cfg)) for cfg in configs(a)]
    if a.dry_run:
        for (_, _, isa), cmd, _, _ in runs:
            pre = f"COPSD_CPU_ISA={isa} " if isa != "native" else ""
            print(pre + " ".join(cmd))
        return 0
    os.makedirs(a.out_dir, exist_ok=True)
    summary = os.path.join(a.out_dir, "matrix.md")
    t_all = time.perf_counter()
    failed = []
    for (shape, dtype, isa), cmd, env, out in runs:
        if os.path.exists(out):
            os.remove(out)  # the peers script appends
        load0 = _load()
        t0 = time.perf_counter()
        print(f"== {shape} {dtype} ISA={isa} (load {load0})", flush=True)
        rc = subprocess.run(cmd, env=env).returncode
        wall = time.perf_counter() - t0
        body = open(out).read().strip() if os.path.exists(out) else ""
        if rc != 0:
            failed.append((shape, dtype, isa, rc))
            body += f"\n\n**exited {rc}** (an output check failed or the run broke: see its log)"
        with open(summary, "a") as f:
            f.write(f"### N,H,V={shape}, {dtype}, ISA {isa}\n\n{body}\n\n"
                    f"Configuration wall time {wall:.0f} s; load average before {load0}, after {_load()}.\n\n")
        print(f"== done in {wall:.0f} s (rc {rc})", flush=True)
    print(f"matrix: {len(runs)} configurations in {time.perf_counter() - t_all:.0f} s -> {summary}")
    for f in failed:
        print("FAILED:", *f)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
