"""Shared speed and peak-memory helpers for the benchmarks (CPU and CUDA).

The one timer and the one memory helper of every benchmark here (CPU and GPU):

* :func:`median_time` -- median wall time of ``fn()`` over repeats (CUDA synchronised; ``budget_s`` sets the
  repeat count from a first timing, for GPU ops of very different sizes);
  :func:`median_times_interleaved` does several callables round-robin (fair under load);
  :func:`median_ms` is :func:`median_time` in milliseconds, without the list of times.
* :func:`cuda_peak_extra` -- peak ``torch.cuda.max_memory_allocated`` above what was
  allocated before the call (inputs excluded, outputs included; ``absolute=True``: the peak itself).
* :func:`cpu_peak_extra` -- peak resident memory above the baseline, measured in a fresh
  subprocess: the child builds the inputs, runs the case once to warm up (thread pools, MKL
  buffers), resets the kernel's high-water mark (``/proc/self/clear_refs``), reads ``VmRSS``,
  runs the case again and reads ``VmHWM``.  glibc is told to serve every block of 64 KiB or more
  with ``mmap`` (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the resident set at once and
  RSS tracks live memory instead of being hidden by allocator reuse.  This counts everything
  the process touches (MKL workspaces, the extension's buffers), not only torch tensors.  The
  child opts out of transparent huge pages (``prctl(PR_SET_THP_DISABLE)``): where the kernel's
  setting is ``always`` a touched page of a fresh mapping may become a resident 2 MiB one, and
  the peak would follow the machine's setting (tests/test_memory.py: +7 MiB for one case).
* :func:`machine` -- a one-line description of the machine for result tables.

And the ``main()`` boilerplate the GPU benchmarks share: :func:`arg_parser` (``--out``, default ``$OUT`` or
``.``), :func:`run_meta` (device, torch/triton versions, UTC date), :func:`write_json` (atomic), :func:`gpu_or_smoke`
(a CUDA device, or a CPU smoke run of the script when asked, or a clean skip).
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

MIB = 2**20


def _sync(device):
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, *, repeats=5, warmup=1, device="cpu", budget_s=None, max_repeats=1000):
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs; returns
    ``(median, [all times])``.  With ``budget_s``, the number of runs is raised so that they take about
    ``budget_s`` seconds in all (from the time of the last warm-up run; at most ``max_repeats``)."""
    last = None
    for _ in range(warmup):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        last = time.perf_counter() - t0
    _sync(device)
    if budget_s is not None and last:
        repeats = max(repeats, min(max_repeats, int(budget_s / max(last, 1e-7))))
    times = []
    for _ in range(repeats):
        gc.collect()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def median_times_interleaved(fns, *, repeats=5, warmup=1, device="cpu"):
    """Like :func:`median_time` for several callables, run round-robin (a, b, c, a, b, c, ...)
    so that load from other processes on a shared machine hits every one alike.
    Returns ``{name: (median, [all times])}``."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(ts), ts) for name, ts in times.items()}


def median_ms(fn, *, repeats=5, warmup=1, device="cpu", budget_s=None):
    """:func:`median_time` in milliseconds (the median only)."""
    return median_time(fn, repeats=repeats, warmup=warmup, device=device, budget_s=budget_s)[0] * 1e3


def cuda_peak_extra(fn, absolute=False):
    """Peak CUDA memory allocated during ``fn()`` above what was allocated before it (bytes); with
    ``absolute=True`` the peak itself (what was allocated before included, e.g. a model's weights)."""
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = 0 if absolute else torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_hwm():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _child_main(script, factory, kwargs_json, warmup="1"):
    """Entry point of the measuring subprocess (see :func:`cpu_peak_extra`)."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(41, *map(ctypes.c_ulong, (1, 0, 0, 0))) != 0:  # PR_SET_THP_DISABLE
        raise RuntimeError("prctl(PR_SET_THP_DISABLE) failed: the peak would follow the huge-page setting")
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    mod_name = os.path.splitext(os.path.basename(script))[0]
    mod = __import__(mod_name)
    fn = getattr(mod, factory)(**json.loads(kwargs_json))
    if warmup == "1":
        fn()  # one-time allocations (thread pools, BLAS buffers) are not the op's
    if hasattr(fn, "reset"):
        fn.reset()  # drop what the warm-up left behind (e.g. .grad), or it would hide in the baseline
    gc.collect()
    try:  # the C++ backend's buffers kept from the warm-up would hide in the baseline too
        from copsd.backends import cpu as copsd_cpu
        copsd_cpu.empty_cache()
    except ImportError:
        pass
    _reset_hwm()
    base = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_extra_bytes": (peak - base) * 1024}))


def cpu_peak_extra(script, factory, timeout=900, warmup=True, **kwargs):
    """Peak extra resident memory (bytes) of one call of ``script.factory(**kwargs)()``.

    ``factory`` builds the inputs and returns the zero-argument callable to measure (with an
    optional ``reset()`` attribute that frees state a call leaves behind, such as ``.grad``); it
    is imported by module name from ``script``'s directory in a fresh Python process.  With
    ``warmup=False`` the measured call is the first one (for very slow callables; one-time
    allocations are then included, which can only overstate the peak).
    """
    if not os.path.exists("/proc/self/clear_refs"):
        raise RuntimeError("cpu_peak_extra needs Linux /proc/self/clear_refs")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import common; "
            "common._child_main(*sys.argv[2:6])")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    res = subprocess.run(
        [sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__)), os.path.abspath(script), factory,
         json.dumps(kwargs), "1" if warmup else "0"],
        env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"memory probe {factory}({kwargs}) failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def machine():
    """CPU model, core count, torch version and UTC date, for result tables."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = f"load avg {os.getloadavg()[0]:.1f}"
    except OSError:
        load = "load n/a"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"{load}, {date}")


# ----------------------------------------------------------------------------- main() boilerplate (GPU benchmarks)


def arg_parser(doc):
    """An ``argparse`` parser described by the first paragraph of ``doc``, with ``--out`` (the result folder,
    default ``$OUT`` or ``.``)."""
    import argparse

    ap = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the result files")
    return ap


def run_meta(device="cuda", **extra):
    """What a result file says about the run: device name, torch (and triton) version, UTC date, and ``extra``."""
    dev = torch.device(device)
    meta = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else machine(),
                torch=torch.__version__, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    meta.update(extra)
    return meta


def write_json(path, obj):
    """Write ``obj`` as JSON to ``path`` atomically (a timed-out run never leaves a half-written file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


def gpu_or_smoke(name, smoke):
    """The device a GPU benchmark runs on: ``"cuda"``; ``"cpu"`` for a smoke run of the script itself
    (``smoke``: tiny shapes, not a benchmark); ``None`` (after saying so) when there is no CUDA device and no
    smoke run was asked for."""
    if smoke:
        return "cpu"
    if not torch.cuda.is_available():
        print(f"{name}: no CUDA device; skipped (a smoke run of the script on CPU: see --help)")
        return None
    return "cuda"
