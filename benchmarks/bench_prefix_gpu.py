"""GPU benchmark: teacher scoring with shared-prefix KV reuse vs naive re-encoding vs the dedup floor.

A ~1.2B-parameter Llama-like random-weight model in bf16 (hidden 2048, 16 layers, 32 query / 8 KV heads,
vocab 128256, tied embeddings); a 2048-token constitution, 16 prompts (96..160 tokens) x G = 16 responses
of 512 tokens.  Three ways to get the same teacher hidden states + log-probs:

* naive: every ``constitution + prompt + response`` re-encoded (``TeacherScorer(prefix_reuse=False)``);
* reuse: ``TeacherScorer`` (cold prefix cache each run), with both attention paths ("masked", "cascade");
* floor: the same number of unique tokens run as independent short sequences (prefix, prompts,
  responses; no attention across them) -- what token deduplication alone would cost.

Correctness: on a subset of requests, the bf16 results are compared with a float32 re-encoding; the
reuse error must be at most 2x the naive bf16 error (+1e-3).  Exit status 1 on a failed check.
Usage: python benchmarks/bench_prefix_gpu.py [--tiny]   (--tiny: small sizes, runs on CPU too)
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import arg_parser, cuda_peak_extra, median_time  # noqa: E402

from copsd import ops
from copsd._hf import tiny_causal_lm
from copsd.teacher import TeacherScorer


def _timed(fn, device, repeats):
    """(median seconds, peak CUDA memory allocated during a run, the last output); benchmarks/common.py's
    timer and memory helper (the peak counts what was allocated before, the model included)."""
    out = []
    med, _ = median_time(lambda: out.append(fn()), repeats=repeats, warmup=0, device=device)
    peak = cuda_peak_extra(lambda: out.append(fn()), absolute=True) if device.type == "cuda" else 0
    return med, peak, out[-1]


@torch.no_grad()
def _floor(model, const, prompts, responses, max_batch_tokens):
    """Unique tokens only, as independent sequences (no cross attention), plus the same log-prob op.  Without
    gradients, as the teacher scorer runs (with them every batch's activations stayed alive through the kept
    log-probs: 139 GiB and out of memory on an H200, 2026-12-04)."""
    dec, head = model.base_model, model.get_output_embeddings()
    dev = head.weight.device
    dec(input_ids=torch.tensor([const], device=dev), use_cache=False)
    dec(input_ids=torch.tensor([[t for p in prompts for t in p]], device=dev), use_cache=False)  # packed
    rows = max(1, max_batch_tokens // len(responses[0]))
    lps = []
    for a in range(0, len(responses), rows):
        ids = torch.tensor(responses[a: a + rows], device=dev)
        h = dec(input_ids=ids, use_cache=False).last_hidden_state
        lps.append(ops.linear_logprobs(h.reshape(-1, h.shape[-1]), head.weight, ids.reshape(-1))[0])
    return torch.cat(lps)


def main(argv=None) -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--tiny", action="store_true", help="small sizes (smoke test, any device)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.tiny and device.type != "cuda":
        print("bench_prefix_gpu: no CUDA device; skipped (a smoke run on any device: --tiny)")
        return 0
    if args.tiny:
        cfg = dict(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
        n_const, n_prompts, g, n_resp, plen, repeats = 64, 3, 4, 16, (6, 12), 1
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        cfg = dict(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                   intermediate_size=8192, tie_word_embeddings=True)
        n_const, n_prompts, g, n_resp, plen, repeats = 2048, 16, 16, 512, (96, 160), 2
        dtype = torch.bfloat16
    model = tiny_causal_lm("llama", dtype=dtype, device=device, seed=0, max_position_embeddings=8192, **cfg)
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    vocab = cfg["vocab_size"]

    def rnd(n):
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    const = rnd(n_const)
    prompts = [rnd(int(torch.randint(plen[0], plen[1] + 1, (1,), generator=gen))) for _ in range(n_prompts)]
    ctxs, resps = [], []
    for p in prompts:
        for _ in range(g):
            ctxs.append(const + p)
            resps.append(rnd(n_resp))
    mbt = 16384
    naive = TeacherScorer(model, prefix_reuse=False, max_batch_tokens=mbt)
    reuse = {a: TeacherScorer(model, attention=a, max_batch_tokens=mbt) for a in ("masked", "cascade")}

    def run_reuse(scorer):
        scorer.clear_cache()
        return scorer.score(ctxs, resps, return_logprobs=True)

    # warm-up (kernel compilation / autotuning) on a small slice
    naive.score(ctxs[:2], [r[:32] for r in resps[:2]], return_logprobs=True)
    _floor(model, const, prompts, resps[:2], mbt)

    ok = True
    checks = []
    rows = []

    def measured(label, t, m):
        """A timed variant, printed when measured, so a run stopped later still shows it."""
        print(f"measured: {label}: {t:.3f} s, peak {m / 2**30:.2f} GiB", flush=True)
        rows.append((label, t, m))
    t_naive, m_naive, out_naive = _timed(lambda: naive.score(ctxs, resps, return_logprobs=True), device,
                                         1 if not args.tiny else repeats)
    measured("naive re-encoding", t_naive, m_naive)
    outs = {}
    for a, s in reuse.items():
        try:
            s.score(ctxs[:2], [r[:32] for r in resps[:2]], return_logprobs=True)  # warm-up
            t, m, outs[a] = _timed(lambda s=s: run_reuse(s), device, repeats)
            measured(f"reuse ({a})", t, m)
        except Exception as err:  # report and go on with the other variants
            ok = False
            checks.append(f"reuse ({a}) FAILED with {type(err).__name__}: {err}")
    t_floor, m_floor, _ = _timed(lambda: _floor(model, const, prompts, resps, mbt), device, repeats)
    measured("unique tokens only (floor)", t_floor, m_floor)

    # correctness: float32 re-encoding of a subset (two prompts, two responses each)
    subset = [0, 1, g, g + 1]
    for a, o in outs.items():
        d = (o.logprobs - out_naive.logprobs).abs().max().item()
        checks.append(f"max |logprob reuse({a}) - naive| ({dtype}, all {len(resps)} requests) = {d:.3e}")
    model.float()
    ref = TeacherScorer(model, prefix_reuse=False).score([ctxs[i] for i in subset], [resps[i] for i in subset],
                                                         return_logprobs=True)

    def sub(o, field):
        t = getattr(o, field)
        return torch.cat([t[o.offsets[i]: o.offsets[i + 1]] for i in subset]).float()

    err_naive = {f: (sub(out_naive, f) - getattr(ref, f).float()).abs().max().item() for f in ("hidden", "logprobs")}
    for a, o in outs.items():
        for f in ("hidden", "logprobs"):
            e = (sub(o, f) - getattr(ref, f).float()).abs().max().item()
            good = e <= 2 * err_naive[f] + 1e-3
            ok &= good
            checks.append(f"{f}: |reuse({a}) - fp32 ref| = {e:.3e}, |naive - fp32 ref| = {err_naive[f]:.3e}"
                          f" -> {'ok' if good else 'FAIL'}")

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    unique = n_const + sum(len(p) for p in prompts) + len(resps) * n_resp
    total = sum(len(c) + len(r) for c, r in zip(ctxs, resps))
    print(f"# bench_prefix_gpu  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  device={name}  "
          f"torch={torch.__version__}")
    print(f"# model: llama-like {n_params / 1e9:.2f}B params {dtype}; constitution {n_const}, {n_prompts} prompts "
          f"x G={g} responses of {n_resp}; tokens: naive {total}, unique {unique}")
    print("| variant | time (s) | peak mem (GiB) | speed-up vs naive | time / floor |")
    print("|---|---|---|---|---|")
    for label, t, m in rows:
        print(f"| {label} | {t:.3f} | {m / 2**30:.2f} | {t_naive / t:.2f}x | {t / t_floor:.2f}x |")
    best = min([t for label, t, _ in rows if label.startswith("reuse")] or [float("inf")])
    print(f"targets: reuse >= 4x faster than naive: {'met' if t_naive / best >= 4 else 'NOT met'} "
          f"({t_naive / best:.2f}x); within 1.2x of floor: {'met' if best / t_floor <= 1.2 else 'NOT met'} "
          f"({best / t_floor:.2f}x)")
    for c in checks:
        print("check:", c)
    print(f"total wall time {time.perf_counter() - start:.1f} s; output check {'PASSED' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
