"""Run ``copsd demo`` over seeds x CPU ISA levels, each from a cold cache, and summarise its targets.

Each cell is a separate ``python -m copsd.cli demo --seed S`` subprocess with a fresh, empty
``COPSD_CACHE_DIR`` (so the toy base is pretrained again) and the ISA level set in its environment:

* ``native``: nothing forced (the best level this CPU has);
* ``base`` / ``avx2`` / ``avx512``: ``COPSD_CPU_ISA`` caps copsd's C++ kernels at that level, and
  ``ATEN_CPU_CAPABILITY`` (``default`` / ``avx2`` / ``avx512``) caps torch's own vectorised kernels,
  so the run sees the fp32 rounding of a CPU without the wider instructions (as far as one machine
  can simulate another: the BLAS still uses what it finds).

It prints every run's four target metrics, then min / median / max per metric and the pass count,
and writes the raw results (every run's metrics, thresholds, phase times, wall time, load average)
as JSON.  Example (the matrix the README reports)::

    python benchmarks/demo_matrix.py --seeds 0 1 2 --isa native base --json benchmarks/raw/demo_matrix.json

``--jobs 2`` runs two cells at a time (each demo uses one torch thread), which halves the wall time
on an idle 2-core machine but makes each run's own time meaningless as a measure of the demo's speed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ATEN_LEVEL = {"base": "default", "avx2": "avx2", "avx512": "avx512"}
TARGET_KEYS = ("harmful_refusal", "benign_compliance", "benign_mean_length", "benign_mean_token_entropy")


def run_cell(seed: int, isa: str, work: str, extra: list[str]) -> dict:
    cache = tempfile.mkdtemp(prefix=f"cache-s{seed}-{isa}-", dir=work)
    out = os.path.join(work, f"demo-s{seed}-{isa}")
    env = dict(os.environ, COPSD_CACHE_DIR=cache)
    env.pop("COPSD_CPU_ISA", None)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if isa != "native":
        env["COPSD_CPU_ISA"] = isa
        env["ATEN_CPU_CAPABILITY"] = ATEN_LEVEL[isa]
    cmd = [sys.executable, "-m", "copsd.cli", "demo", "--seed", str(seed), "--output_dir", out, "--no_progress",
           *extra]
    load_before = os.getloadavg()
    t0 = time.time()
    # output to a file, not a pipe: a run outlives this driver (killed, or a closed terminal) instead of
    # dying on its next write, and --collect can still summarise it
    log_path = out + ".log"
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    cell = {"seed": seed, "isa": isa, "command": " ".join(cmd), "returncode": proc.returncode,
            "wall_seconds": round(wall, 1),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()], "output_dir": out, "log": log_path}
    if proc.returncode != 0 or not os.path.isfile(os.path.join(out, "report.json")):
        with open(log_path) as f:
            cell["error"] = f.read()[-3000:]
        return cell
    return add_report(cell, out)


def add_report(cell: dict, out: str) -> dict:
    """Add the metrics, targets and times of the demo report in ``out`` to ``cell``."""
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    models = {m["name"]: m["metrics"] for m in report["eval"]["models"]}
    cell.update(targets=report["targets"], passed=sum(t["passed"] for t in report["targets"]),
                phase_seconds=report["seconds"], cpu_seconds=report.get("cpu_seconds"), machine=report.get("machine"),
                models={name: {k: models[name].get(k) for k in (*TARGET_KEYS, "constitution_leak_rate")}
                        for name in models})
    # the ratio of each metric to its threshold (>= 1 passes): the margin, comparable across metrics
    cell["margin"] = {t["metric"]: (t["value"] / t["threshold"] if t["value"] is not None and t["threshold"]
                                    else None) for t in report["targets"]}
    return cell


def collect(work: str) -> list[dict]:
    """Cells from the ``demo-s<seed>-<isa>/report.json`` files already in ``work`` (runs started by
    another driver, or by hand with the same layout); the wall time is the demo's own total."""
    cells = []
    for name in sorted(os.listdir(work)):
        parts = name.split("-")
        out = os.path.join(work, name)
        if len(parts) != 3 or parts[0] != "demo" or not os.path.isfile(os.path.join(out, "report.json")):
            continue
        cell = add_report({"seed": int(parts[1][1:]), "isa": parts[2], "output_dir": out, "returncode": 0}, out)
        cell["wall_seconds"] = cell["phase_seconds"]["total"]
        cells.append(cell)
    return cells


def summarise(cells: list[dict]) -> dict:
    ok = [c for c in cells if "targets" in c]
    out = {"runs": len(cells), "completed": len(ok), "all_targets_passed": sum(c["passed"] == 4 for c in ok),
           "metrics": {}}

    def mmm(xs):
        xs = [x for x in xs if x is not None]
        return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)} if xs else None

    for key in TARGET_KEYS:
        out["metrics"][key] = {
            "copsd_student": mmm([c["models"]["copsd_student"][key] for c in ok]),
            "base": mmm([c["models"]["base"][key] for c in ok]),
            "naive_opsd_student": mmm([c["models"]["naive_opsd_student"][key] for c in ok]),
            "margin": mmm([c["margin"][key] for c in ok]),
            "passed": sum(t["passed"] for c in ok for t in c["targets"] if t["metric"] == key),
        }
    out["wall_seconds"] = mmm([c["wall_seconds"] for c in cells])
    out["cpu_seconds"] = mmm([c.get("cpu_seconds") for c in ok])
    return out


def _print_cell(c: dict):
    if "targets" in c:
        vals = "  ".join(f"{t['metric']} {t['value']:.3f}/{t['threshold']:.3f}{'' if t['passed'] else ' MISS'}"
                         for t in c["targets"])
        load = f"load {c['loadavg_before'][0]:.1f}  " if "loadavg_before" in c else ""
        print(f"seed {c['seed']} {c['isa']:>6}: {c['passed']}/4  {c['wall_seconds']:.0f} s wall  "
              f"{c.get('cpu_seconds') or 0:.0f} s CPU  {load}{vals}", flush=True)
    else:
        print(f"seed {c['seed']} {c['isa']:>6}: FAILED (exit {c['returncode']})\n{c['error']}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--isa", nargs="+", default=["native", "base"], choices=["native", "base", "avx2", "avx512"])
    ap.add_argument("--jobs", type=int, default=1, help="cells run at once (default 1: honest per-run times)")
    ap.add_argument("--work_dir", default=None, help="where caches and demo outputs go (default: a temp dir)")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "raw",
                                                   "demo_matrix.json"), help="raw results file")
    ap.add_argument("--demo_args", nargs=argparse.REMAINDER, default=[],
                    help="passed on to `copsd demo` (e.g. --demo_args --quick)")
    ap.add_argument("--collect", metavar="WORK_DIR", default=None,
                    help="run nothing: summarise the demo-s<seed>-<isa>/report.json files in WORK_DIR")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs: expected an int >= 1, got {args.jobs}")
    started = datetime.datetime.now(datetime.timezone.utc)
    if args.collect:
        work = os.path.abspath(args.collect)
        if not os.path.isdir(work):
            ap.error(f"--collect: {work} is not a directory")
        cells = collect(work)
        for c in cells:
            _print_cell(c)
    else:
        work = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="copsd-demo-matrix-"))
        os.makedirs(work, exist_ok=True)
        grid = [(s, isa) for s in args.seeds for isa in args.isa]
        print(f"{len(grid)} runs ({args.jobs} at a time), work dir {work}", flush=True)
        cells = []
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futs = {pool.submit(run_cell, s, isa, work, args.demo_args): (s, isa) for s, isa in grid}
            for fut in concurrent.futures.as_completed(futs):
                cells.append(fut.result())
                _print_cell(cells[-1])
    if not cells:
        print("no completed runs")
        return 1
    cells.sort(key=lambda c: (c["seed"], c["isa"]))
    summary = summarise(cells)
    print(f"\n{'metric':<28}{'copsd_student min / median / max':>36}{'margin min':>12}{'passed':>8}")
    for key, m in summary["metrics"].items():
        s, mg = m["copsd_student"], m["margin"]
        if s is None:
            continue
        print(f"{key:<28}{s['min']:>12.3f}{s['median']:>12.3f}{s['max']:>12.3f}{mg['min']:>12.3f}"
              f"{m['passed']:>5}/{summary['completed']}")
    w = summary["wall_seconds"]
    print(f"\nruns with all 4 targets met: {summary['all_targets_passed']}/{summary['runs']}; wall per run "
          f"{w['min']:.0f} / {w['median']:.0f} / {w['max']:.0f} s (min / median / max)")
    result = {"started_utc": started.isoformat(timespec="seconds"),
              "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "host": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                       "python": platform.python_version()},
              "seeds": sorted({c["seed"] for c in cells}), "isa": sorted({c["isa"] for c in cells}),
              "jobs": None if args.collect else args.jobs, "demo_args": None if args.collect else args.demo_args,
              "collected_from": work if args.collect else None,
              "summary": summary, "cells": cells}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.json)
    print(f"raw results: {args.json}")
    return 0 if summary["all_targets_passed"] == summary["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
