"""CPU benchmark: shared-prefix KV reuse in teacher scoring and shared prompt prefill in rollouts.

Model: random-weight Llama, hidden 256, 4 layers (4 heads, 2 KV heads), vocab 32000, float32.
* Teacher: constitution 512 tokens, 4 prompts of 64 tokens, G = 8 responses of 64 tokens each, hidden
  states + log-probs.  naive = ``TeacherScorer(prefix_reuse=False)`` (every sequence re-encoded) vs
  ``TeacherScorer`` with a cold prefix cache (cleared before every run) and with a warm one.
* Rollouts: 4 prompts of 256 tokens, G = 8, 32 new tokens, sampling at temperature 1:
  ``copsd.rollout.generate`` (prompt prefilled once, cache repeated G times) vs
  ``model.generate(num_return_sequences=G)``.
Times: best of N, all variants interleaved in one process (fair under a fluctuating machine load).
Memory: each variant runs once in its own spawned process; "peak RSS growth" is that process's peak
resident memory over its model-loaded baseline.  Outputs are checked (reuse == naive; greedy rollouts ==
``model.generate``); exit status 1 on a failed check.

Usage: python benchmarks/bench_prefix.py [--repeats N]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import median_times_interleaved  # noqa: E402

MODEL = dict(vocab_size=32000, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
             intermediate_size=1024, max_position_embeddings=2048)


def _model():
    from copsd._hf import tiny_causal_lm

    return tiny_causal_lm("llama", seed=0, **MODEL)


def _teacher_batch():
    gen = torch.Generator().manual_seed(0)
    const = torch.randint(3, MODEL["vocab_size"], (512,), generator=gen).tolist()
    ctxs, resps = [], []
    for _ in range(4):
        prompt = torch.randint(3, MODEL["vocab_size"], (64,), generator=gen).tolist()
        for _ in range(8):
            ctxs.append(const + prompt)
            resps.append(torch.randint(3, MODEL["vocab_size"], (64,), generator=gen).tolist())
    return ctxs, resps


def _prompts(n=4, length=256):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, MODEL["vocab_size"], (length,), generator=gen).tolist() for _ in range(n)]


def _rss_mib():
    """This process's peak resident size (VmHWM; ru_maxrss would carry a parent's across fork + exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _make(variant, model):
    from copsd.rollout import generate
    from copsd.teacher import TeacherScorer

    ctxs, resps = _teacher_batch()
    prompts = _prompts()
    g = 8
    if variant.startswith(("naive", "reuse")):
        scorer = TeacherScorer(model, prefix_reuse=not variant.startswith("naive"))
        with_lp = variant.endswith("+lp")

        def fn():
            if variant.startswith("reuse-cold"):
                scorer.clear_cache()
            out = scorer.score(ctxs, resps, return_logprobs=with_lp)
            return out.logprobs if with_lp else out.hidden
    elif variant == "rollout-copsd":
        def fn():
            gen = torch.Generator().manual_seed(0)
            return generate(model, prompts, num_generations=g, max_new_tokens=32, temperature=1.0,
                            eos_token_id=[], generator=gen)
    elif variant == "rollout-hf":
        ids = torch.tensor(prompts)

        def fn():
            torch.manual_seed(0)
            return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                  top_k=0, top_p=1.0, num_return_sequences=g, max_new_tokens=32,
                                  min_new_tokens=32, pad_token_id=0)
    else:
        raise ValueError(f"variant: unknown {variant!r}")
    if variant == "reuse-warm":
        fn()  # fills the prefix cache
    return fn


def _worker(variant, repeats, queue):
    """Peak memory of one run of ``variant`` in a fresh process (and its output, for the checks)."""
    torch.manual_seed(0)
    fn = _make(variant, _model())
    base = _rss_mib()
    out = fn()
    peak = _rss_mib() - base
    result = out.tolist() if isinstance(out, torch.Tensor) else None  # plain data through the queue
    queue.put((variant, None, peak, result))


def _interleaved_times(variants, repeats):
    """Best-of-``repeats`` times, variants interleaved in one process so they see the same machine load
    (``median_times_interleaved`` of benchmarks/common.py, the timer of every benchmark here)."""
    model = _model()
    fns = {v: _make(v, model) for v in variants}
    timed = median_times_interleaved(fns, repeats=repeats, warmup=0)
    return {v: min(ts) for v, (_, ts) in timed.items()}


def _run(variant, repeats):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_worker, args=(variant, repeats, q))
    p.start()
    res = q.get()
    p.join()
    return res


def _check_greedy():
    """Greedy rollouts (shared prefill, G = 2) equal model.generate on each prompt, token for token."""
    from copsd.rollout import generate

    model = _model()
    prompts = [p[: 64 + 16 * i] for i, p in enumerate(_prompts())]
    out = generate(model, prompts, num_generations=2, max_new_tokens=8, temperature=0, eos_token_id=[])
    for j, comp in enumerate(out.completion_ids):
        p = prompts[out.prompt_index[j]]
        ids = torch.tensor([p])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                             min_new_tokens=8, pad_token_id=0)[0, len(p):].tolist()
        if ref != comp:
            return False
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    variants = ("naive", "reuse-cold", "reuse-warm", "naive+lp", "reuse-cold+lp", "rollout-hf", "rollout-copsd")
    res = {v: list(_run(v, 1)) for v in variants}
    for v, t in _interleaved_times(variants, args.repeats).items():
        res[v][1] = t
    naive = torch.tensor(res["naive"][3])
    d_cold = (torch.tensor(res["reuse-cold"][3]) - naive).abs().max().item()
    d_warm = (torch.tensor(res["reuse-warm"][3]) - naive).abs().max().item()
    d_lp = (torch.tensor(res["reuse-cold+lp"][3]) - torch.tensor(res["naive+lp"][3])).abs().max().item()
    greedy_ok = _check_greedy()
    ok = max(d_cold, d_warm, d_lp) <= 1e-4 and greedy_ok

    print(f"# bench_prefix (CPU)  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"best of {args.repeats}")
    print("# model: llama hidden 256, 4 layers, vocab 32000, fp32; teacher batch: constitution 512, "
          "4 prompts x 64, G=8 responses x 64")
    print("| task | variant | time (s) | peak RSS growth (MiB) | speed-up |")
    print("|---|---|---|---|---|")
    t0 = res["naive"][1]
    for v, label in (("naive", "naive re-encoding"), ("reuse-cold", "prefix reuse, cold cache"),
                     ("reuse-warm", "prefix reuse, warm cache"), ("naive+lp", "naive re-encoding"),
                     ("reuse-cold+lp", "prefix reuse, cold cache")):
        what = "hidden + log-probs" if v.endswith("+lp") else "hidden states"
        base = res["naive+lp"][1] if v.endswith("+lp") else t0
        print(f"| teacher {what} | {label} | {res[v][1]:.3f} | {res[v][2]:.0f} | {base / res[v][1]:.2f}x |")
    t1 = res["rollout-hf"][1]
    for v, label in (("rollout-hf", "model.generate(num_return_sequences=8)"),
                     ("rollout-copsd", "copsd generate (shared prefill)")):
        print(f"| rollout 4x256, G=8, 32 new | {label} | {res[v][1]:.3f} | {res[v][2]:.0f} | {t1 / res[v][1]:.2f}x |")
    print(f"targets: teacher reuse (cold) >= 3x: {'met' if t0 / res['reuse-cold'][1] >= 3 else 'NOT met'}; "
          f"rollout >= 1.5x: {'met' if t1 / res['rollout-copsd'][1] >= 1.5 else 'NOT met'}")
    print(f"check: max |hidden reuse - naive| cold {d_cold:.2e}, warm {d_warm:.2e}; log-probs {d_lp:.2e}; "
          "greedy rollouts == "
          f"model.generate: {greedy_ok} -> {'PASSED' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
