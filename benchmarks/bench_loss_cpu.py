"""CPU benchmark of the fused lm_head loss ops: the C++ backend (``backend="cpu"``) against
naive PyTorch (materialised logits, log_softmax, KL) and the chunked reference backend.

Issue-3 targets at N=2048, H=256, V=32000, float32 (reverse KL unless noted):
  divergence fwd+bwd, reduction="mean": time <= 1.0x naive, peak extra memory <= 1/8 naive;
  divergence fwd+bwd, reduction="none": time <= 1.6x naive;
  top-k (k=64): time <= 1.0x (matmul + torch.topk);  log-probs + entropy fwd+bwd: <= 1.0x naive.

Every fused/reference result is checked against the naive result at the benchmark size before
it is timed; the script exits non-zero on a mismatch.  Times are medians (``--repeats``) with
the implementations run round-robin (the checked first call doubles as warm-up); memory is
the peak resident memory above the baseline in a fresh subprocess
(``common.cpu_peak_extra``), inputs excluded, outputs (gradients) included.  Liger-Kernel has
no CPU path and is not measured here.

Run: ``python benchmarks/bench_loss_cpu.py [--n 2048 --h 256 --v 32000 --repeats 5] [--out FILE.md]``
(about 3-5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import common  # noqa: E402

from copsd import ops  # noqa: E402
from copsd import reference as _ref  # noqa: E402  (the dense reference of every op, shared with the tests)

_ref_topk = _ref.topk

K_TOP = 64
IMPLS = ("naive", "reference", "cpu")


# ----------------------------------------------------------------------------- problems


def _inputs(n, h, v, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, h, generator=g).to(dtype)
    xt = torch.randn(n, h, generator=g).to(dtype)
    ws = (torch.randn(v, h, generator=g) / h**0.5 * 2).to(dtype)
    wt = (torch.randn(v, h, generator=g) / h**0.5 * 2).to(dtype)
    ids = torch.randint(0, v, (n,), generator=g)
    up = torch.rand(n, generator=g)
    return xs, ws, xt, wt, ids, up


def naive_reverse_kl(xs, ws, xt, wt):
    """Per-token KL(q||p) the plain way (the package's dense reference: full [N, V] logits, log_softmax)."""
    return _ref.divergence(xs, ws, xt.detach(), wt.detach(), kind="reverse_kl")


def naive_logprobs(x, w, ids):
    lp, ent, _ = _ref.logprobs(x, w, ids)
    return lp, ent


# Factories: build inputs, return a zero-argument callable that runs the case once and
# returns its outputs (also used by common.cpu_peak_extra in a subprocess).


def make_divergence(impl, reduction, backward, n, h, v):
    xs, ws, xt, wt, _, up = _inputs(n, h, v)
    xs.requires_grad_(backward)
    ws.requires_grad_(backward)

    def run():
        xs.grad = ws.grad = None
        if impl == "naive":
            loss = naive_reverse_kl(xs, ws, xt, wt)
            loss = loss.mean() if reduction == "mean" else loss
        else:
            loss = ops.linear_divergence(xs, ws, xt, wt, kind="reverse_kl", reduction=reduction, backend=impl)
        if backward:
            (loss if reduction == "mean" else (loss * up).sum()).backward()
            return loss.detach(), xs.grad, ws.grad
        return (loss.detach(),)

    run.reset = lambda: setattr(xs, "grad", None) or setattr(ws, "grad", None)
    return run


def make_logprobs(impl, backward, n, h, v):
    x, w, _, _, ids, _ = _inputs(n, h, v)
    x.requires_grad_(backward)
    w.requires_grad_(backward)

    def run():
        x.grad = w.grad = None
        if impl == "naive":
            lp, ent = naive_logprobs(x, w, ids)
        else:
            lp, ent, _ = ops.linear_logprobs(x, w, ids, return_entropy=True, backend=impl)
        if backward:
            (lp.sum() + ent.sum()).backward()
            return lp.detach(), ent.detach(), x.grad, w.grad
        return lp, ent

    run.reset = lambda: setattr(x, "grad", None) or setattr(w, "grad", None)
    return run


def make_logprobs_loss(impl, n, h, v):
    """A PPO-like per-token loss of the log-probs and entropies, forward + backward.  ``<backend>:fused`` is
    ``ops.linear_logprobs_loss`` (gradient in the forward pass, 3 GEMMs); the others compute the log-probs
    first and backpropagate through them (4 GEMMs for the fused ops, autograd for naive)."""
    x, w, _, _, ids, up = _inputs(n, h, v)
    x.requires_grad_(True)
    w.requires_grad_(True)

    def per_token(lp, ent, rows):
        return -up[rows] * torch.exp(lp) + 0.01 * ent

    def run():
        x.grad = w.grad = None
        if impl == "naive":
            lp, ent = naive_logprobs(x, w, ids)
            loss = per_token(lp, ent, slice(None)).sum()
        elif impl.endswith(":fused"):
            loss, _, _ = ops.linear_logprobs_loss(x, w, ids, per_token, backend=impl.split(":")[0])
        else:
            lp, ent, _ = ops.linear_logprobs(x, w, ids, return_entropy=True, backend=impl)
            loss = per_token(lp, ent, slice(None)).sum()
        loss.backward()
        return loss.detach(), x.grad, w.grad

    run.reset = lambda: setattr(x, "grad", None) or setattr(w, "grad", None)
    return run


def make_topk(impl, n, h, v, k=K_TOP):
    x, w, _, _, _, _ = _inputs(n, h, v)

    def run():
        if impl == "naive":  # the baseline: matmul + torch.topk
            return (x @ w.T).topk(k, dim=1)
        if impl == "naive+lse":  # same outputs as the fused op (log-probs need the LSE): the dense reference
            idx, lp, _ = _ref_topk(x, w, k)
            return lp, idx
        ids, lp, _ = ops.linear_topk(x, w, k, backend=impl)
        return lp, ids

    return run


CASES = {
    # name: (factory, kwargs, impls)
    "divergence fwd (none)": (make_divergence, dict(reduction="none", backward=False), IMPLS),
    "divergence fwd+bwd (mean)": (make_divergence, dict(reduction="mean", backward=True), IMPLS),
    "divergence fwd+bwd (none)": (make_divergence, dict(reduction="none", backward=True), IMPLS),
    "logprobs+entropy fwd": (make_logprobs, dict(backward=False), IMPLS),
    "logprobs+entropy fwd+bwd": (make_logprobs, dict(backward=True), IMPLS),
    "logprobs loss fwd+bwd": (make_logprobs_loss, dict(), ("naive", "reference", "cpu", "cpu:fused")),
    "top-k k=64": (make_topk, dict(), ("naive", "naive+lse", "reference", "cpu")),
}


# ----------------------------------------------------------------------------- checks


def check(case, outs):
    """Compare every implementation's outputs with the naive ones; raise on a mismatch."""
    base = outs["naive"]
    for impl, out in outs.items():
        if impl == "naive":
            continue
        if case.startswith("top-k"):
            lp, ids = out
            if impl == "naive+lse":
                continue
            lp_n = outs["naive+lse"][0]
            # Values must match; ids may differ only inside exact ties (sets with tie tolerance).
            torch.testing.assert_close(lp.float(), lp_n.float(), rtol=0, atol=1e-4)
            assert (ids.sort(1).values.diff(dim=1) > 0).all(), f"{impl}: repeated ids"
            continue
        for i, (g, w) in enumerate(zip(out, base)):
            scale = w.abs().max().item()
            err = (g.double() - w.double()).abs().max().item()
            if err > 2e-4 * (1 + scale):
                raise AssertionError(f"{case} / {impl}: output {i} differs from naive by {err:.3g} "
                                     f"(scale {scale:.3g})")


# ----------------------------------------------------------------------------- main


def run(n, h, v, repeats, memory=True, cases=None, impls_only=None):
    rows = []
    script = os.path.abspath(__file__)
    for case, (factory, kw, impls) in CASES.items():
        if cases and case not in cases:
            continue
        outs, fns, once = {}, {}, {}
        if impls_only:
            impls = [i for i in impls if i in impls_only or i.startswith("naive")]
        for impl in impls:
            fns[impl] = factory(impl=impl, n=n, h=h, v=v, **kw)
            t0 = time.perf_counter()
            outs[impl] = fns[impl]()
            once[impl] = time.perf_counter() - t0
        check(case, outs)
        del outs
        # The reference backend is 4-20x slower than the rest; its single checked call is
        # its time (noted in the table) so the whole run stays within minutes.
        fast = {i: f for i, f in fns.items() if i != "reference"}
        timed = common.median_times_interleaved(fast, repeats=repeats, warmup=0)
        for impl in impls:
            t = timed[impl][0] if impl in timed else once[impl]
            mem = (common.cpu_peak_extra(script, factory.__name__, warmup=impl != "reference", impl=impl, n=n, h=h,
                                         v=v, **kw)
                   if memory else float("nan"))
            runs = len(timed[impl][1]) if impl in timed else 1
            rows.append(dict(case=case, impl=impl, ms=t * 1e3, mib=mem / common.MIB, runs=runs))
            print(f"{case:28s} {impl:10s} {t * 1e3:9.1f} ms  {mem / common.MIB:8.1f} MiB", flush=True)
        fns.clear()
    return rows


def table(rows, n, h, v, repeats):
    naive = {r["case"]: r for r in rows if r["impl"] == "naive"}
    lines = [
        f"CPU loss ops, N={n}, H={h}, V={v}, float32, reverse KL; median of {repeats} runs; "
        "memory = peak RSS above baseline in a fresh process (outputs incl.)",
        "",
        f"Machine: {common.machine()}",
        "",
        "| case | impl | time (ms) | runs | x naive | peak extra (MiB) | x naive |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        b = naive[r["case"]]
        tr = r["ms"] / b["ms"]
        mr = r["mib"] / b["mib"] if b["mib"] and b["mib"] == b["mib"] else float("nan")
        lines.append(f"| {r['case']} | {r['impl']} | {r['ms']:.1f} | {r['runs']} | {tr:.2f} | {r['mib']:.1f} "
                     f"| {mr:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--h", type=int, default=256)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-memory", action="store_true", help="skip the subprocess memory probes")
    p.add_argument("--case", action="append", help="run only these cases (repeatable)")
    p.add_argument("--impl", action="append", help="time only these implementations (naive always runs)")
    p.add_argument("--out", help="also write the markdown table here")
    a = p.parse_args(argv)
    rows = run(a.n, a.h, a.v, a.repeats, memory=not a.no_memory, cases=a.case, impls_only=a.impl)
    md = table(rows, a.n, a.h, a.v, a.repeats)
    print()
    print(md)
    if a.out:
        with open(a.out, "w") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    main()
