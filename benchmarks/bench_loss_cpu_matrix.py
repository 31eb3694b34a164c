"""The CPU loss ops against their peers over the matrix of issue 17, one command: every shape x input dtype x
copsd epilogue ISA runs ``bench_loss_cpu_peers.py`` in its own fresh process (the ISA is chosen when the
extension loads, so ``COPSD_CPU_ISA`` must be set before the process starts), with same-round ratios to the GEMM
floors and, where asked, per-implementation peak memory in further fresh processes.  One markdown table per
configuration is written to ``--out-dir`` (``<N>x<H>x<V>_<dtype>_<isa>.md``) and all of them, with each
configuration's wall time and the load average before and after it, to ``--out-dir/matrix.md``.

Default matrix: N=2048 H=256 V=32000 and N=4096 H=512 V=32000; float32 and bfloat16; ``COPSD_CPU_ISA=avx2`` and
native (the best the CPU has); ``--isa avx2only`` adds a run with the whole process at AVX2 (MKL's GEMMs and ATen's
kernels too), what an AVX2-only CPU runs. The whole matrix with every case and implementation would take over an
hour on an idle 2-core machine (the large shape is 8x the GEMM work; every ``torch.compile`` peer compiles again in
each fresh process), so the defaults trade completeness for time: ``--repeats 2`` timed rounds after the checked
warm-up; every implementation only in the fp32 native run of the small shape (``--full-config``), elsewhere the
floors, copsd and the peers that came within ~1.5x of it before (``--short-impl``; naive still runs once as the
reference of the checks); at the large shape the cases ``--large-case`` (reverse KL, log-probs + entropy, top-k);
peak memory probed in the native runs of the small shape (it does not depend on the epilogue ISA), for naive and the
short list (``--memory*``). Estimated ~30 min on an idle 2-core machine, half of it the large shape (the fp32 AVX2
short-list run of the small shape took 184 CPU-seconds); ~15 min: ``--large-case rkl`` or ``--shape
2048,256,32000``. ``--dry-run`` prints the commands.

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
# were 2-4x the floor throughout): what every configuration but --full-config times by default, and whose peak
# memory (with naive's) is probed.
SHORT_IMPLS = ("copsd", "copsd:bf16all", "copsd:loss", "chunked+compile", "liger", "liger:bf16", "cce")
FULL_CONFIG = f"{SHAPES[0]},float32,native"
LARGE_CASES = ("rkl", "lpent", "topk")
# ``--isa avx2only``: the whole process at AVX2, as on a CPU without AVX-512 (copsd's epilogues, MKL's GEMMs and
# ATen's own vector kernels), where ``avx2`` keeps MKL and ATen at what the CPU has (on an AVX-512 Xeon MKL's GEMMs
# are then ~2x faster than the epilogues' width suggests: the harsher ratio).  The peers benchmark pins
# torch.compile's CPU vector width to 256 bits in such a process (left to choose, it computed wrong results there).
WHOLE_AVX2 = {"COPSD_CPU_ISA": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


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
    for c in a.case or (a.large_case if shape != SHAPES[0] else ()):
        cmd += ["--case", c]
    for i in a.impl or (a.short_impl if f"{shape},{dtype},{isa}" not in a.full_config else ()):
        cmd += ["--impl", i]
    if (a.memory == "all" or (a.memory == "native" and isa == "native")) and shape in a.memory_shapes:
        cmd.append("--memory")
        for i in a.memory_impl or ():
            cmd += ["--memory-impl", i]
    env = dict(os.environ)
    for k in ("COPSD_CPU_ISA", *WHOLE_AVX2):
        env.pop(k, None)
    if isa == "avx2only":
        env.update(WHOLE_AVX2)
    elif isa != "native":
        env["COPSD_CPU_ISA"] = isa
    return cmd, env, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M")
    p.add_argument("--shape", action="append", help=f"N,H,V (repeatable; default {' and '.join(SHAPES)})")
    p.add_argument("--dtype", action="append", choices=DTYPES, help="input dtype (repeatable; default both)")
    p.add_argument("--isa", action="append", choices=("base", "avx2", "avx512", "native", "avx2only"),
                   help="COPSD_CPU_ISA of the run (repeatable; default avx2 and native); avx2only: the whole "
                        "process at AVX2 (COPSD_CPU_ISA, MKL_ENABLE_INSTRUCTIONS and ATEN_CPU_CAPABILITY)")
    p.add_argument("--case", action="append", help="only these cases at every shape (see bench_loss_cpu_peers.py)")
    p.add_argument("--large-case", nargs="*", default=list(LARGE_CASES),
                   help=f"cases run at the shapes other than {SHAPES[0]} (default: %(default)s)")
    p.add_argument("--impl", action="append", help="time only these implementations in every configuration")
    p.add_argument("--short-impl", nargs="*", default=list(SHORT_IMPLS),
                   help="implementations timed in the configurations not in --full-config (default: %(default)s)")
    p.add_argument("--full-config", nargs="*", default=[FULL_CONFIG],
                   help="N,H,V,dtype,isa configurations that time every implementation (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="timed round-robin rounds per configuration")
    p.add_argument("--memory", choices=("all", "native", "none"), default="native",
                   help="peak-memory probes (fresh processes) in every run, the native-ISA runs, or none")
    p.add_argument("--memory-shapes", nargs="*", default=[SHAPES[0]],
                   help="shapes whose runs probe memory (default: %(default)s)")
    p.add_argument("--memory-impl", nargs="*", default=["naive", *SHORT_IMPLS],
                   help="implementations whose memory is probed (default: %(default)s; none given: all timed)")
    p.add_argument("--out-dir", default=os.path.join(HERE, "raw", f"cpu_matrix_{stamp}"))
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    a = p.parse_args(argv)
    runs = [(cfg, *command(a, *cfg)) for cfg in configs(a)]
    if a.dry_run:
        for _cfg, cmd, env, _ in runs:
            pre = "".join(f"{k}={env[k]} " for k in WHOLE_AVX2 if k in env)
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
