"""CPU loss ops against their peers, side by side in one process: copsd's C++ backend, the GEMM floors, naive
PyTorch, a 256-row chunked autograd loop (eager and ``torch.compile``), and -- when installed (``pip install
-e .[bench]``) -- Liger-Kernel's ``LigerFusedLinearJSDLoss``, cut-cross-entropy's ``torch_compile`` path and TRL's
``generalized_jsd_loss`` (optional: a missing or CPU-incapable package is skipped with the reason, never required).

Cases (per-token losses summed; every gradient w.r.t. the student hidden states and lm_head):
  rkl      reverse KL(student || teacher) fwd+bwd, floor = 4 GEMMs (two logits, d_hidden, d_weight);
           peers Liger and TRL at beta = 1
  fkl      forward KL(teacher || student) fwd+bwd, floor = 4 GEMMs; Liger and TRL at beta = 0
  jsd      generalised JSD (beta = 0.5) fwd+bwd, floor = 4 GEMMs; Liger and TRL at beta = 0.5
  lpent    log-probs + entropy fwd+bwd (a PPO-like loss of both): copsd ``linear_logprobs`` + backward against the
           4-GEMM floor ``floor4`` (logits, logits again in backward, d_hidden, d_weight), ``copsd:loss``
           (``linear_logprobs_loss``) and the rest against the 3-GEMM ``floor`` (logits, d_hidden, d_weight)
  ce       cross-entropy fwd+bwd, floors as lpent; peer cut-cross-entropy
  topk     top-64 log-probs, floor = 1 GEMM
  tkrkl    reverse KL on the teacher's top 64 ids plus the tail bucket (objective ``topk``; the op selects the ids
           from ``topk=64``) fwd+bwd, floor = 4 GEMMs; no peer has this loss

Liger's and TRL's beta weighs the teacher in the mixture, as copsd's does: beta = 0 is the forward KL, 1 the
reverse KL.  Naive is the package's dense reference of each op (``copsd.reference``, the formulas the tests check
against; the losses of ``lpent`` / ``ce`` are written on its log-probs and entropies).  bf16 inputs: the GEMMs of
naive, the chunked loops, the optional peers and the floors run on fp32 copies of the inputs (bf16 GEMMs without
AVX512-BF16 are far slower, and torch's round their outputs to bf16), gradients flow back to the bf16 leaves;
``liger:bf16`` is Liger on the bf16 inputs as given (bf16 GEMMs, bf16 logits).  copsd's own logits GEMMs of bf16
inputs run on AVX512-BF16 dot products where the CPU has them (fp32 products and sums), so on such a CPU copsd can
run below the fp32 floor; ``copsd:bf16all`` is copsd with ``COPSD_CPU_BF16_GEMM=all`` (its gradient GEMMs on those
dot products too, dL/dz rounded to bf16), for bf16 inputs only.

A floor runs the GEMMs alone into preallocated outputs (no softmax, no allocation): nothing that computes the
loss that way can be faster.  Implementations run round-robin, ``--repeats`` rounds; each round's time is divided
by the same round's floor and the table reports the median of those same-round ratios (robust on a shared machine)
next to the median time.  Every implementation's outputs are checked against naive before timing (the script
exits non-zero on a mismatch).  With ``--memory`` each implementation's peak extra resident memory is measured
in a fresh process (``common.cpu_peak_extra``).

Run: ``python benchmarks/bench_loss_cpu_peers.py [--n 2048 --h 256 --v 32000] [--dtype float32|bfloat16]
[--case rkl ...] [--impl copsd ...] [--repeats 5] [--memory] [--out FILE.md]``.  ``COPSD_CPU_ISA=avx2`` (or
``base``) caps the instruction set of copsd's epilogues.  ``bench_loss_cpu_matrix.py`` runs this script over
the shapes, dtypes and ISA levels of issue 17, one fresh process per configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import common  # noqa: E402

from copsd import reference as _ref  # noqa: E402  (the dense reference of every op, shared with the tests)

_ref_topk = _ref.topk

from copsd import ops  # noqa: E402

if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() == "avx2":
    # The matrix's `avx2only` runs (the whole process at AVX2 on a CPU that has AVX-512): left to choose its vector
    # width, torch.compile's CPU code then computes wrong results (torch 2.13.0+cpu on a Zen 4: the compiled chunked
    # loop's reverse-KL sum about half of eager's, NaN in bf16; benchmarks/RESULTS.md, 2026-12-01).  Pinned to 256
    # bits, what it would choose on an AVX2-only CPU, its results agree with eager's.
    import torch._inductor.config as _inductor_config

    _inductor_config.cpp.simdlen = 256

K_TOP = 64
CASES = ("rkl", "fkl", "jsd", "lpent", "ce", "topk", "tkrkl")
CHUNK = 256
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _inputs(n, h, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, h, generator=g).to(dtype)
    xt = torch.randn(n, h, generator=g).to(dtype)
    ws = (torch.randn(v, h, generator=g) / h**0.5 * 2).to(dtype)
    wt = (torch.randn(v, h, generator=g) / h**0.5 * 2).to(dtype)
    ids = torch.randint(0, v, (n,), generator=g)
    up = torch.rand(n, generator=g)
    return xs, ws, xt, wt, ids, up


# ----------------------------------------------------------------------------- per-token losses on logits


DIV_KIND = {"rkl": "reverse_kl", "fkl": "forward_kl", "jsd": "jsd", "tkrkl": "reverse_kl"}
JSD_BETA = 0.5
# tkrkl: reverse KL on the teacher's top K_TOP ids plus the tail bucket (objective "topk"), the ids computed by the
# op from an int k.  No peer has it: copsd against naive (teacher logits, torch.topk, the dense divergence) and the
# same 4-GEMM floor as the full-vocabulary divergences.
TOPK_SUPPORT = {"tkrkl": dict(support="teacher_topk", tail="bucket")}


def _f32(t):
    return t.float() if t.dtype == torch.bfloat16 else t


@contextlib.contextmanager
def _bf16_gemm(mode):
    """COPSD_CPU_BF16_GEMM=mode around a call (read per op call; None: as the environment has it)."""
    old = os.environ.get("COPSD_CPU_BF16_GEMM")
    if mode is not None:
        os.environ["COPSD_CPU_BF16_GEMM"] = mode
    try:
        yield
    finally:
        if mode is not None:
            if old is None:
                del os.environ["COPSD_CPU_BF16_GEMM"]
            else:
                os.environ["COPSD_CPU_BF16_GEMM"] = old


def _div(case, xs, ws, xt, wt):
    """Per-token divergence of the reference (teacher side without gradient)."""
    extra = {}
    if case in TOPK_SUPPORT:
        with torch.no_grad():
            ids = (_f32(xt) @ _f32(wt).T).topk(K_TOP, dim=1).indices
        extra = dict(TOPK_SUPPORT[case], topk_ids=ids)
    return _ref.divergence(_f32(xs), _f32(ws), _f32(xt).detach(), _f32(wt).detach(), kind=DIV_KIND[case],
                           beta=JSD_BETA, **extra)


def _lpent(x, w, ids, up):
    lp, ent, _ = _ref.logprobs(_f32(x), _f32(w), ids)
    return -up * lp.exp() + 0.01 * ent


def _ce(x, w, ids):
    lp, _, _ = _ref.logprobs(_f32(x), _f32(w), ids)
    return -lp


_compiled = {}


def _chunk_fn(case, compiled):
    """Per-chunk loss sum of the 256-row loop (compiled once per case)."""
    def div(xc, ws, xtc, wt):
        return _div(case, xc, ws, xtc, wt).sum()

    def lpent(xc, w, idc, upc):
        return _lpent(xc, w, idc, upc).sum()

    def ce(xc, w, idc):
        return _ce(xc, w, idc).sum()

    fn = {"rkl": div, "fkl": div, "jsd": div, "lpent": lpent, "ce": ce}[case]
    if not compiled:
        return fn
    if case not in _compiled:
        _compiled[case] = torch.compile(fn, dynamic=False)
    return _compiled[case]


# ----------------------------------------------------------------------------- optional peers


# Liger's and TRL's generalised JSD take beta as the weight of the teacher in the mixture m = (1 - beta) q + beta p
# (q student, p teacher) and weigh KL(p || m) by beta: beta = 0 is KL(p || q), the forward KL, beta = 1 is
# KL(q || p), the reverse KL -- the same convention as copsd's ``kind="jsd", beta``.
PEER_BETA = {"rkl": 1.0, "fkl": 0.0, "jsd": JSD_BETA}


def _liger_jsd(case):
    """Liger's fused linear JSD at the case's beta; None (and the reason) if not importable."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return None, f"liger-kernel not importable ({type(e).__name__}: {e})"
    # The chunked-loss family is plain PyTorch under torch.compile (runs on CPU); soft loss only.
    return LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=PEER_BETA[case],
                                   temperature=1.0), None


def _cce():
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as e:  # noqa: BLE001
        return None, f"cut-cross-entropy not importable ({type(e).__name__}: {e})"
    return linear_cross_entropy, None


def _trl_gjsd():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                from trl.experimental.gkd.gkd_trainer import GKDTrainer
            except ImportError:
                from trl.trainer.gkd_trainer import GKDTrainer
    except Exception as e:  # noqa: BLE001
        return None, f"trl not importable ({type(e).__name__}: {e})"
    return GKDTrainer.generalized_jsd_loss, None


# ----------------------------------------------------------------------------- factories

TWO_FLOOR_CASES = ("lpent", "ce")  # log-probs cases: the loss-in-forward path (3 GEMMs) and forward + backward (4)
OPTIONAL_PEERS = ("liger", "liger:bf16", "trl", "cce")


def impls_for(case):
    base = ["floor", "naive", "chunked", "chunked+compile", "copsd", "copsd:bf16all"]
    div = base + ["liger", "liger:bf16", "trl"]
    return {"rkl": div, "fkl": div, "jsd": div,
            "lpent": ["floor", "floor4"] + base[1:] + ["copsd:loss"],
            "ce": ["floor", "floor4"] + base[1:] + ["copsd:loss", "cce"],
            "topk": ["floor", "naive", "copsd"], "tkrkl": ["floor", "naive", "copsd"]}[case]


def floor_of(case, impl):
    """The floor an implementation's time is divided by: the GEMMs its algorithm cannot avoid.  ``linear_logprobs``
    + backward recomputes the logits in its backward (4 GEMMs: ``floor4``); everything else that computes the
    log-probs cases keeps the logits or forms the gradient in the forward pass (3 GEMMs: ``floor``), the
    divergences need 4 (``floor``) and top-k 1 (``floor``).  ``floor4`` itself is shown against ``floor``."""
    return "floor4" if case in TWO_FLOOR_CASES and impl in ("copsd", "copsd:bf16all") else "floor"


def floor_gemms(case, floor="floor"):
    if case == "topk":
        return 1
    return 4 if case in DIV_KIND or floor == "floor4" else 3


def make_case(case, impl, n, h, v, dtype="float32"):
    """Zero-argument callable running one implementation of one case; returns its outputs (loss, grads...), for
    a floor its GEMMs' outputs.  Raises ``RuntimeError("skip: ...")`` when an optional peer is unavailable."""
    dt = DTYPES[dtype]
    xs, ws, xt, wt, ids, up = _inputs(n, h, v, dt)
    grad = case != "topk"
    if not impl.startswith("floor"):
        xs.requires_grad_(grad)
        ws.requires_grad_(grad)

    if impl in ("floor", "floor4"):
        if impl == "floor4" and case not in TWO_FLOOR_CASES:
            raise RuntimeError(f"skip: no floor4 for {case}")
        gd = torch.float32 if dt == torch.bfloat16 else dt  # GEMMs as copsd runs them (fp32 accumulate/out)
        a, b, c, d = (t.to(gd) for t in (xs, ws, xt, wt))
        z1, z2 = torch.empty(n, v, dtype=gd), torch.empty(n, v, dtype=gd)
        dx, dw = torch.empty(n, h, dtype=gd), torch.empty(v, h, dtype=gd)
        second = case in DIV_KIND or impl == "floor4"  # the teacher's logits, or the student's recomputed

        def run():
            torch.mm(a, b.T, out=z1)
            if second:
                torch.mm(c if case in DIV_KIND else a, (d if case in DIV_KIND else b).T, out=z2)
            if not grad:
                return (z1,)
            torch.mm(z1, b, out=dx)
            torch.mm(z1.T, a, out=dw)
            return (z1, z2, dx, dw) if second else (z1, dx, dw)
        run.gemms = floor_gemms(case, impl)
        run.operands = (a, b, c, d)
        return run

    # Outputs in their own dtypes (check() compares in float64): an fp32 copy of a bf16 [V, H] gradient made here
    # would be timed and, worse, counted in every implementation's peak memory (+31 MiB at V = 32000, H = 256).
    def grads(loss):
        loss.backward()
        return loss.detach(), xs.grad, ws.grad

    def reset():
        xs.grad = ws.grad = None

    def with_reset(fn):
        """``fn`` that starts from no gradient, with ``reset`` for the memory probe (drops the warm-up's)."""
        def run():
            reset()
            return fn()
        run.reset = reset
        return run

    if case == "topk":
        if impl == "naive":
            return lambda: _ref_topk(_f32(xs), _f32(ws), K_TOP)[1]
        if impl == "copsd":
            return lambda: ops.linear_topk(xs, ws, K_TOP, backend="cpu")[1].float()
        raise RuntimeError(f"skip: no {impl} for topk")

    if impl == "naive":
        def run():
            if case in DIV_KIND:
                loss = _div(case, xs, ws, xt, wt).sum()
            elif case == "lpent":
                loss = _lpent(xs, ws, ids, up).sum()
            else:
                loss = _ce(xs, ws, ids).sum()
            return grads(loss)
        return with_reset(run)

    if impl in ("chunked", "chunked+compile"):
        fn = _chunk_fn(case, impl.endswith("compile"))

        def run():
            total = 0.0
            for r0 in range(0, n, CHUNK):
                sl = slice(r0, r0 + CHUNK)
                if case in DIV_KIND:
                    loss = fn(xs[sl], ws, xt[sl], wt)
                elif case == "lpent":
                    loss = fn(xs[sl], ws, ids[sl], up[sl])
                else:
                    loss = fn(xs[sl], ws, ids[sl])
                loss.backward()
                total += loss.detach().float()
            return total, xs.grad, ws.grad
        return with_reset(run)

    if impl in ("copsd", "copsd:bf16all"):
        if impl == "copsd:bf16all" and dt != torch.bfloat16:
            raise RuntimeError("skip: copsd:bf16all differs from copsd for bf16 inputs only")
        mode = "all" if impl == "copsd:bf16all" else None

        def run():
            with _bf16_gemm(mode):
                return run_copsd()

        def run_copsd():
            if case in DIV_KIND:
                extra = dict(TOPK_SUPPORT[case], topk=K_TOP) if case in TOPK_SUPPORT else {}
                loss = ops.linear_divergence(xs, ws, xt, wt, kind=DIV_KIND[case], beta=JSD_BETA, reduction="sum",
                                             backend="cpu", **extra)
            elif case == "lpent":
                lp, ent, _ = ops.linear_logprobs(xs, ws, ids, return_entropy=True, backend="cpu")
                loss = (-up * lp.exp() + 0.01 * ent).sum()
            else:
                lp, _, _ = ops.linear_logprobs(xs, ws, ids, backend="cpu")
                loss = -lp.sum()
            return grads(loss)
        return with_reset(run)

    if impl == "copsd:loss":
        if case not in TWO_FLOOR_CASES:
            raise RuntimeError(f"skip: no copsd:loss for {case}")

        def run():
            if case == "ce":
                loss, _, _ = ops.linear_logprobs_loss(xs, ws, ids, lambda lp, ent, rows: -lp, backend="cpu")
            else:
                loss, _, _ = ops.linear_logprobs_loss(
                    xs, ws, ids, lambda lp, ent, rows: -up[rows] * lp.exp() + 0.01 * ent, backend="cpu")
            return grads(loss)
        return with_reset(run)

    # The optional peers get fp32 copies of bf16 inputs like naive and the chunked loops (their GEMMs would
    # otherwise run in bf16, far slower on a CPU without AVX512-BF16); gradients flow back to the bf16 leaves.
    # Except liger:bf16, Liger on the bf16 inputs as given, as a user calls it: its GEMMs run in bf16 (oneDNN; fast
    # where the CPU has AVX512-BF16) and round the logits and gradients to bf16, so it passes the bf16 check's looser
    # tolerance with larger errors than copsd's fp32-accurate logits (RESULTS.md gives both errors).
    if impl in ("liger", "liger:bf16"):
        if case not in DIV_KIND:
            raise RuntimeError(f"skip: no {impl} for {case}")
        if impl == "liger:bf16" and dt != torch.bfloat16:
            raise RuntimeError("skip: Liger on the inputs as given is 'liger' for fp32 inputs")
        mod, why = _liger_jsd(case)
        if mod is None:
            raise RuntimeError("skip: " + why)
        cast = (lambda t: t) if impl == "liger:bf16" else _f32

        def run():
            # Liger takes [N, H] hiddens and [V, H] weights of both models (+ labels for its hard loss, weighted 0)
            # and returns the mean over tokens (no label is its ignore_index -100).
            loss = mod(cast(xs), cast(ws), cast(xt), cast(wt), ids) * n
            return grads(loss)
        return with_reset(run)

    if impl == "trl":
        if case not in DIV_KIND:
            raise RuntimeError(f"skip: no trl for {case}")
        fn, why = _trl_gjsd()
        if fn is None:
            raise RuntimeError("skip: " + why)

        def run():
            with torch.no_grad():
                zt = _f32(xt) @ _f32(wt).T
            # reduction "sum" over tokens and vocabulary.
            loss = fn(_f32(xs) @ _f32(ws).T, zt, beta=PEER_BETA[case], reduction="sum")
            return grads(loss)
        return with_reset(run)

    if impl == "cce":
        if case != "ce":
            raise RuntimeError(f"skip: no cce for {case}")
        fn, why = _cce()
        if fn is None:
            raise RuntimeError("skip: " + why)

        def run():
            loss = fn(_f32(xs), _f32(ws), ids, impl="torch_compile", reduction="sum")
            return grads(loss)
        return with_reset(run)

    raise RuntimeError(f"skip: no {impl} for {case}")


# ----------------------------------------------------------------------------- check / run


def check(case, impl, out, ref, dtype):
    """Raise if an implementation's outputs (loss, gradients; top-k log-probs) differ from naive's."""
    if impl.startswith("floor"):
        return
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    if len(outs) != len(refs):
        raise AssertionError(f"{case} / {impl}: {len(outs)} outputs, naive has {len(refs)}")
    tol = 2e-4 if dtype == "float32" else 3e-2
    for i, (g, w) in enumerate(zip(outs, refs)):
        g, w = torch.as_tensor(g).double(), torch.as_tensor(w).double()
        if g.shape != w.shape:
            raise AssertionError(f"{case} / {impl}: output {i} has shape {tuple(g.shape)}, naive {tuple(w.shape)}")
        scale = w.abs().max().item()
        err = (g - w).abs().max().item()
        if not err <= tol * (1 + scale):  # NaN fails too
            raise AssertionError(f"{case} / {impl}: output {i} differs from naive by {err:.3g} (scale {scale:.3g})")


def run_case(case, n, h, v, dtype, repeats, memory, only=None, memory_only=None):
    """Build, check and time one case.  ``only``: the implementations to time (the case's floors are always timed;
    naive always runs once as the reference of the checks and is timed only when selected).  ``memory``: probe the
    peak memory of the timed implementations (``memory_only``: of those among them only)."""
    fns, skipped = {}, {}
    timed = [i for i in impls_for(case) if not only or i in only or i.startswith("floor")]
    for impl in dict.fromkeys(timed + ["naive"]):  # the table's order
        try:
            fns[impl] = make_case(case, impl, n, h, v, dtype)
        except RuntimeError as e:
            if not str(e).startswith("skip:"):
                raise
            skipped[impl] = str(e)[6:]
    ref = fns["naive"]()
    if "naive" not in timed:
        del fns["naive"]
    for impl, fn in list(fns.items()):
        try:
            out = fn()  # warm-up (and compilation), checked
        except Exception as e:  # noqa: BLE001 - an optional peer failing on CPU is reported, not fatal
            if impl in OPTIONAL_PEERS:
                skipped[impl] = f"fails on CPU ({type(e).__name__}: {str(e)[:160]})"
                del fns[impl]
                continue
            raise
        try:
            check(case, impl, out, ref, dtype)
        except AssertionError as e:
            if impl.startswith("copsd"):  # (check() passes every floor)
                raise
            # A peer that computes a wrong result is reported, not timed, and does not cost the run copsd's figures
            # (as torch.compile's CPU code did at the top of this file before its vector width was pinned).
            skipped[impl] = f"wrong output, not timed ({e})"
            del fns[impl]
        del out
    del ref
    for impl, why in skipped.items():
        print(f"  [{case}] {impl}: skipped -- {why}", flush=True)
    # round-robin rounds (the warm-up above was the checked call); each list is in round order
    times = {i: ts for i, (_, ts) in common.median_times_interleaved(fns, repeats=repeats, warmup=0).items()}
    rows = []
    for impl in fns:
        fl = "floor" if impl == "floor4" else floor_of(case, impl)
        ratios = [t / f for t, f in zip(times[impl], times[fl])]
        mem = float("nan")
        if memory and not impl.startswith("floor") and (not memory_only or impl in memory_only):
            mem = common.cpu_peak_extra(os.path.abspath(__file__), "make_case", case=case, impl=impl, n=n, h=h, v=v,
                                        dtype=dtype) / common.MIB
        rows.append(dict(case=case, impl=impl, ms=statistics.median(times[impl]) * 1e3, floor=floor_gemms(case, fl),
                         ratio=statistics.median(ratios), mib=mem))
        print(f"  {case:6s} {impl:16s} {rows[-1]['ms']:9.1f} ms  x{rows[-1]['ratio']:.2f} floor "
              f"({rows[-1]['floor']} GEMMs)  {mem:8.1f} MiB", flush=True)
    if memory and "naive" not in fns and (not memory_only or "naive" in memory_only):  # untimed, but the yardstick
        mem = common.cpu_peak_extra(os.path.abspath(__file__), "make_case", case=case, impl="naive", n=n, h=h, v=v,
                                    dtype=dtype) / common.MIB
        rows.append(dict(case=case, impl="naive", ms=float("nan"), floor=floor_gemms(case), ratio=float("nan"),
                         mib=mem))
        print(f"  {case:6s} naive (memory only)  {mem:8.1f} MiB", flush=True)
    for impl, why in skipped.items():
        rows.append(dict(case=case, impl=impl, skipped=why))
    return rows


def table(rows, args):
    isa = os.environ.get("COPSD_CPU_ISA", "native")
    from copsd.backends import cpu
    lines = [
        f"N={args.n}, H={args.h}, V={args.v}, {args.dtype} inputs, copsd epilogue ISA {cpu.isa()} "
        f"(COPSD_CPU_ISA={isa}; MKL_ENABLE_INSTRUCTIONS={os.environ.get('MKL_ENABLE_INSTRUCTIONS', 'unset')}, "
        f"ATen {torch.backends.cpu.get_cpu_capability()}; fp32 GEMM kernel {cpu.f32_gemm_summary()}); "
        f"{args.repeats} round-robin rounds; "
        "`x floor` = median of same-round ratios to the "
        "floor named in `floor` (its GEMMs alone: the 3-GEMM floor of the log-probs cases for everything that keeps "
        "the logits or forms the gradient in the forward pass, the 4-GEMM one for `linear_logprobs` + backward, "
        "which recomputes the logits; `floor4` itself is shown against the 3-GEMM floor).",
        "",
        f"Machine: {common.machine()}",
        "",
        "| case | impl | median ms | x floor | floor | peak extra MiB |",
        "|---|---|---:|---:|---|---:|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['case']} | {r['impl']} | skipped: {r['skipped']} | | | |")
        else:
            mem = "" if r["mib"] != r["mib"] else f"{r['mib']:.0f}"
            if r["ms"] != r["ms"]:  # memory probe only
                lines.append(f"| {r['case']} | {r['impl']} | not timed | | | {mem} |")
                continue
            lines.append(f"| {r['case']} | {r['impl']} | {r['ms']:.0f} | {r['ratio']:.2f} | {r['floor']} GEMMs "
                         f"| {mem} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--h", type=int, default=256)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--case", action="append", choices=list(CASES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory", action="store_true", help="peak memory per implementation (fresh processes)")
    p.add_argument("--memory-impl", action="append", help="with --memory: probe only these implementations")
    p.add_argument("--out", help="append the markdown table to this file")
    p.add_argument("--impl", action="append",
                   help="time only these implementations (the floors always; naive runs once for the checks)")
    a = p.parse_args(argv)
    rows = []
    for case in a.case or CASES:
        rows += run_case(case, a.n, a.h, a.v, a.dtype, a.repeats, a.memory, a.impl, a.memory_impl)
    md = table(rows, a)
    print()
    print(md)
    if a.out:
        with open(a.out, "a") as f:
            f.write(md + "\n\n")


if __name__ == "__main__":
    main()
