"""Compile every Triton kernel copsd launches for an H100 (sm_90), on a machine without a GPU.

The Triton interpreter (``TRITON_INTERPRET=1``, what the CPU tests run) executes kernels as NumPy
and never lowers them, so it misses everything the GPU compiler would reject (types, layouts,
shared memory) and says nothing about register pressure.  This script closes that gap offline:

1. It drives the Triton backend's entry points (``copsd.backends.triton``'s lm_head ops for both the
   ``fused`` and the ``chunked`` path, and the cascade-attention kernels) on small CPU tensors with
   the GPU launch configurations (not the interpreter's tiny tiles), with ``JITFunction.run``
   replaced by a recorder: each launch is recorded (argument types, constexprs, ``num_warps``,
   ``num_stages``, 16-divisibility of pointers and integers as the GPU launcher specialises them)
   and nothing runs.  Outputs are therefore garbage; they are never looked at.
2. It compiles each distinct specialisation ahead of time for ``cuda:90`` with Triton's bundled
   ``ptxas`` (``triton.compile`` on an ``ASTSource``; no driver needed) and reads the cubin's
   resource usage with the bundled ``cuobjdump``: registers per thread, the stack frame per thread
   (where ptxas puts register spills: non-zero = spills) and shared memory, which must fit the
   H100's 227 KiB per block.

Run it with ``TRITON_INTERPRET`` unset (the script refuses otherwise, since the kernels must be
JIT functions, not interpreted ones):

    python benchmarks/triton_sm90.py            # table of every specialisation
    python benchmarks/triton_sm90.py --json out.json

Exit status 1 when any specialisation fails to compile or needs more shared memory than sm_90 has.
``tests/test_triton_sm90.py`` runs it in CI.  The numbers are static properties of the compiled
code for this machine's Triton version; the GPU image's Triton may differ (benchmarks/RESULTS.md
says which version produced a table), and speed still needs a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SM90_SMEM_LIMIT = 227 * 1024  # max dynamic shared memory per block on H100 (sm_90)

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("triton_sm90.py: unset TRITON_INTERPRET (the kernels must be JIT functions to be compiled)")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.runtime.jit as _jit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
           torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
           torch.bool: "i1"}


@dataclass
class Launch:
    kernel: str
    fn: object
    signature: dict
    constexprs: dict
    divisible: tuple
    options: dict
    sites: set = field(default_factory=set)

    def key(self):
        return (self.kernel, tuple(sorted(self.signature.items())), tuple(sorted(self.constexprs.items())),
                self.divisible, tuple(sorted(self.options.items())))

    def label(self):
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        ptrs = ",".join(sorted({t for t in self.signature.values() if t.startswith("*")}))
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.kernel}[{ptrs}]({consts}){{{opts}}}"


class Recorder:
    """Replaces ``JITFunction.run``: records the launch, runs nothing."""

    def __init__(self):
        self.launches: dict = {}
        self.site = "?"

    def run(self, fn, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "num_ctas") if k in kwargs}
        names = fn.arg_names
        try:
            ba = fn.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{fn.__name__}: {e}") from None
        ba.apply_defaults()
        bound = ba.arguments
        constexpr_names = {fn.arg_names[i] for i in fn.constexprs}
        signature, constexprs, divisible = {}, {}, []
        for i, n in enumerate(names):
            v = bound[n]
            if n in constexpr_names or v is None:
                signature[n] = "constexpr"
                constexprs[n] = v
            elif isinstance(v, torch.Tensor):
                signature[n] = "*" + _DTYPES[v.dtype]
                # the GPU allocator aligns to >= 256 B; a view's offset decides (as the launcher does)
                if (v.storage_offset() * v.element_size()) % 16 == 0:
                    divisible.append(i)
            elif isinstance(v, bool):
                signature[n] = "i1"
            elif isinstance(v, int):
                if v == 1:  # the launcher specialises 1 to a constant
                    signature[n] = "constexpr"
                    constexprs[n] = 1
                    continue
                signature[n] = "i32" if -(2**31) <= v < 2**31 else "i64"
                if v % 16 == 0:
                    divisible.append(i)
            elif isinstance(v, float):
                signature[n] = "fp32"
            else:
                raise TypeError(f"{fn.__name__}: cannot type argument {n}={v!r}")
        rec = Launch(fn.__name__, fn, signature, constexprs, tuple(divisible), options)
        rec = self.launches.setdefault(rec.key(), rec)
        rec.sites.add(self.site)
        return None


@contextlib.contextmanager
def recording():
    rec = Recorder()
    original = _jit.JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        return rec.run(self, *args, grid=grid, warmup=warmup, **kwargs)

    _jit.JITFunction.run = run
    try:
        yield rec
    finally:
        _jit.JITFunction.run = original


# ----------------------------------------------------------------------------- driving the backend


def _drive_linear(rec, path: str, dtype):
    """Every launch of the fused lm_head ops for one path and dtype (small shapes, GPU configs)."""
    from copsd.backends import triton as tl_
    from copsd.ops._spec import DivergenceSpec, LogitSpec

    os.environ["COPSD_TRITON_PATH"] = path
    g = torch.Generator().manual_seed(0)
    N, H, V = 48, 128, 1000
    x = torch.randn(N, H, generator=g).to(dtype)
    w = torch.randn(V, H, generator=g).to(dtype)
    xt = torch.randn(N, H, generator=g).to(dtype)
    wt = torch.randn(V, H, generator=g).to(dtype)
    ids = torch.randint(0, V, (N,), generator=g)
    ones = torch.ones(N)
    for cap in (None, 30.0):
        logit = LogitSpec(temperature=0.7, logit_scale=1.0, softcap=cap)
        rec.site = f"logprobs {path} {dtype} softcap={cap}"
        lp, ent, lse = tl_.logprobs_forward(x, w, ids, logit)
        for g_ent in (None, ones):
            tl_.logprobs_backward(x, w, ids, torch.zeros(N), torch.zeros(N), ones, g_ent, None, logit)
        tl_.logprobs_backward(x, w, ids, torch.zeros(N), torch.zeros(N), None, ones, ones, logit)
        rec.site = f"logprobs_loss {path} {dtype} softcap={cap}"
        tl_.logprobs_loss(x, w, ids, logit, lambda r0, rows, lp, ent: (ones[:rows], None))
        tl_.logprobs_loss(x, w, ids, logit, lambda r0, rows, lp, ent: (ones[:rows], ones[:rows]))
        for k in (8, 64, 200):
            rec.site = f"topk k={k} {path} {dtype} softcap={cap}"
            tl_.topk(x, w, k, logit)
        for kind in ("reverse_kl", "forward_kl", "jsd"):
            for clip in (None, 5.0):
                div = DivergenceSpec(kind=kind, beta=0.3, support="full", term_clip=clip)
                rec.site = f"divergence full {kind} clip={clip} {path} {dtype} softcap={cap}"
                for tg in (None, ones):
                    tl_.divergence(x, w, xt, wt, logit, div, token_grad=tg)
            for tail in ("bucket", "renorm", "none"):
                div = DivergenceSpec(kind=kind, beta=0.3, support="teacher_topk", tail=tail)
                K = torch.randint(0, V, (N, 16), generator=g)
                rec.site = f"divergence topk {tail} {kind} {path} {dtype} softcap={cap}"
                tl_.divergence(x, w, xt, wt, logit, div, topk_ids=K, token_grad=ones)


def _drive_attention(rec, dtype):
    from copsd.backends import _triton_attention as ta

    g = torch.Generator().manual_seed(0)
    for d, hq, hkv, p in ((64, 8, 2, 40), (128, 8, 8, 0), (128, 4, 1, 24), (80, 4, 2, 16), (256, 4, 2, 8)):
        b, s = 3, 20
        q = torch.randn(b, s, hq, d, generator=g).to(dtype)
        k = torch.randn(b, s, hkv, d, generator=g).to(dtype)
        v = torch.randn(b, s, hkv, d, generator=g).to(dtype)
        pk = torch.randn(p, hkv, d, generator=g).to(dtype)
        pv = torch.randn(p, hkv, d, generator=g).to(dtype)
        for lens in (None, torch.tensor([20, 7, 0])):
            rec.site = f"shared_prefix_attention d={d} hq={hq} hkv={hkv} P={p} lens={lens is not None} {dtype}"
            ta.shared_prefix_attention(q, k, v, pk, pv, d ** -0.5, lens)
        rec.site = f"merge_attention_states d={d} {dtype}"
        o = torch.randn(b, s, hq, d, generator=g).to(dtype)
        lse = torch.randn(b, hq, s, generator=g)
        ta.merge_attention_states(o, lse, o.clone(), lse.clone())


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def record_all(dtypes=tuple(DTYPES)):
    with recording() as rec:
        for dtype in (DTYPES[d] for d in dtypes):
            for path in ("fused", "chunked"):
                _drive_linear(rec, path, dtype)
            _drive_attention(rec, dtype)
    return list(rec.launches.values())


# ----------------------------------------------------------------------------- compiling


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _tool(name):
    d = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return str(d / name)


def compile_sm90(launch: Launch):
    """Compile one specialisation for cuda:90; returns a dict of resource usage (or the error)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i in launch.divisible}
    t0 = time.perf_counter()
    try:
        src = ASTSource(launch.fn, dict(launch.signature), dict(launch.constexprs), attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(launch.options))
    except Exception as e:  # a compile error is the finding
        msg = str(e).strip().splitlines()
        return {"ok": False, "error": f"{type(e).__name__}: {msg[-1] if msg else ''}"[:400]}
    out = {"ok": True, "compile_s": round(time.perf_counter() - t0, 2),
           "shared": int(k.metadata.shared), "num_warps": k.metadata.num_warps,
           "num_stages": k.metadata.num_stages}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        r = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                           capture_output=True, text=True, check=False)
    m = _RES.search(r.stdout)
    if m:
        out.update(regs=int(m.group(1)), stack=int(m.group(2)), local=int(m.group(4)))
    out["fits_smem"] = out["shared"] <= SM90_SMEM_LIMIT
    out["ptx_sha"] = ptx_digest(k.asm["ptx"])
    return out


def ptx_digest(ptx: str) -> str:
    """SHA-256 of the PTX without its source-location and debug lines: equal digests before and after a
    refactoring of a kernel's Python source mean the GPU code did not change."""
    import hashlib

    keep = []
    in_debug = False
    for line in ptx.splitlines():
        t = line.strip()
        if t.startswith(".section") and ".debug" in t:
            in_debug = True
        if in_debug:
            if t == "}":
                in_debug = False
            continue
        if t.startswith((".loc", ".file", "//")) or not t or re.fullmatch(r"\$L__tmp\d+:", t):
            continue  # source locations and the labels of inlined-call debug scopes
        keep.append(t)
    return hashlib.sha256("\n".join(keep).encode()).hexdigest()[:16]


def cover(launches):
    """A subset in which every (kernel, pointer dtypes) group still has each of its constexpr values and
    launch options compiled at least once; the most specialised (most flags on) launches first."""
    groups: dict = {}
    for r in launches:
        ptrs = tuple(sorted(t for t in r.signature.values() if t.startswith("*")))
        groups.setdefault((r.kernel, ptrs), []).append(r)

    def features(r):
        return {("c", k, repr(v)) for k, v in r.constexprs.items()} | {("o", k, v) for k, v in r.options.items()}

    chosen = []
    for group in groups.values():
        need = set().union(*(features(r) for r in group))
        pool = sorted(group, key=lambda r: -sum(bool(v) for v in r.constexprs.values()))
        while need:
            best = max(pool, key=lambda r: len(features(r) & need))
            chosen.append(best)
            need -= features(best)
            pool.remove(best)
    return sorted(chosen, key=lambda r: r.label())


_PENDING: list = []


def _compile_index(i):
    return compile_sm90(_PENDING[i])


def _compile_all(launches, jobs):
    """compile_sm90 over launches, in forked worker processes when jobs > 1 (order kept)."""
    if jobs <= 1 or len(launches) <= 1:
        return [compile_sm90(r) for r in launches]
    import multiprocessing as mp

    _PENDING[:] = launches
    with mp.get_context("fork").Pool(min(jobs, len(launches))) as pool:
        return pool.map(_compile_index, range(len(launches)), chunksize=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the full results here")
    ap.add_argument("--filter", default="", help="only kernels whose name contains one of these (comma-separated)")
    ap.add_argument("--cover", action="store_true",
                    help="compile a covering subset: per kernel and pointer dtypes, enough specialisations that "
                         "every constexpr value and launch option seen is compiled at least once (CI)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (fork)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="input dtypes to drive (comma-separated)")
    args = ap.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"--dtypes: expected names from {list(DTYPES)}, got {d!r}")
    wanted = [f for f in args.filter.split(",") if f]
    launches = [r for r in record_all(dtypes) if not wanted or any(f in r.kernel for f in wanted)]
    launches.sort(key=lambda r: r.label())
    if args.cover:
        launches = cover(launches)
    print(f"triton {triton.__version__}, torch {torch.__version__}; {len(launches)} specialisations, target cuda:90")
    print("| kernel specialisation | regs | stack B (spills) | shared KiB | compile s |")
    print("|---|---|---|---|---|")
    results, bad = [], 0
    for r, res in zip(launches, _compile_all(launches, args.jobs)):
        results.append({"kernel": r.kernel, "label": r.label(), "sites": sorted(r.sites), **res})
        if not res["ok"]:
            bad += 1
            print(f"| {r.label()} | COMPILE ERROR: {res['error']} | | | |")
            continue
        if not res["fits_smem"]:
            bad += 1
        flag = "" if res["fits_smem"] else " **over sm_90 limit**"
        print(f"| {r.label()} | {res.get('regs', '?')} | {res.get('stack', '?')} | "
              f"{res['shared'] / 1024:.1f}{flag} | {res['compile_s']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "results": results}, indent=1))
    spilling = sum(1 for r in results if r.get("stack"))
    print(f"{len(launches) - bad} of {len(launches)} specialisations compile for sm_90 and fit its shared memory; "
          f"{spilling} spill registers")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
