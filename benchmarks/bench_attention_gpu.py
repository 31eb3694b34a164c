"""GPU benchmark: cascade (shared-prefix) attention vs PyTorch SDPA, plus the attention-state merge.

For B sequences that share one P-token prefix and have S own tokens each:

* ``cascade``      -- ``copsd.ops.attention.shared_prefix_attention`` (prefix K/V stored once);
* ``sdpa-reencode`` -- SDPA (flash, causal) over the concatenated ``prefix + own`` sequences, i.e. what
  re-encoding every sequence costs in attention (it also needs B copies of the prefix K/V; KV heads
  are expanded to Hq for SDPA);
* ``sdpa-masked``  -- SDPA with the suffix queries only against ``prefix + own`` keys (B copies of the
  prefix K/V, KV heads expanded) and a boolean mask: the same useful work as the cascade.

Every timed output is checked against the dense float64 attention of ``copsd.reference`` (the reference the
tests use), on the first sequences: the cascade's error must be at most twice that of SDPA re-encoding in the
same precision; the script exits non-zero on a mismatch.
Run: ``python benchmarks/bench_attention_gpu.py [--out DIR]`` (about 30 s on an H100, most of it Triton
compilation); the tables go to stdout and ``bench_attention_gpu.json`` to ``--out`` (default ``$OUT`` or ``.``).
``--cpu-smoke`` runs tiny shapes on CPU (reference backend) to check the script itself.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import MIB, arg_parser, cuda_peak_extra, gpu_or_smoke, median_ms, run_meta, write_json  # noqa: E402

from copsd import reference as dense  # noqa: E402

DEVICE = "cuda"  # "--cpu-smoke" runs tiny shapes on CPU (reference backend) to check this script itself


def time_ms(fn):
    return median_ms(fn, repeats=15, warmup=3, device=DEVICE)


def peak_mib(fn):
    return float("nan") if DEVICE == "cpu" else cuda_peak_extra(fn) / MIB


def bench_case(b, s, hq, hkv, d, p, dtype, failures):
    from copsd.ops.attention import shared_prefix_attention

    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(b, s, hq, d, device=DEVICE, dtype=dtype, generator=g)
    k = torch.randn(b, s, hkv, d, device=DEVICE, dtype=dtype, generator=g)
    v = torch.randn(b, s, hkv, d, device=DEVICE, dtype=dtype, generator=g)
    pk = torch.randn(p, hkv, d, device=DEVICE, dtype=dtype, generator=g)
    pv = torch.randn(p, hkv, d, device=DEVICE, dtype=dtype, generator=g)

    # SDPA layout [B, H, T, D]; every sequence gets its own copy of the prefix (that is the naive cost)
    full_k = torch.cat([pk.unsqueeze(0).expand(b, p, hkv, d), k], 1).transpose(1, 2).contiguous()
    full_v = torch.cat([pv.unsqueeze(0).expand(b, p, hkv, d), v], 1).transpose(1, 2).contiguous()
    pq = torch.zeros(b, p, hq, d, device=DEVICE, dtype=dtype)  # prefix queries: re-encoding computes them too
    full_q = torch.cat([pq, q], 1).transpose(1, 2).contiguous()
    q_t = q.transpose(1, 2).contiguous()
    pos = torch.arange(s, device=DEVICE)
    mask = torch.ones(s, p + s, dtype=torch.bool, device=DEVICE)
    mask[:, p:] = pos[None, :] <= pos[:, None]

    def cascade():
        return shared_prefix_attention(q, k, v, pk, pv)

    # KV heads expanded: SDPA's fused kernels then run for sure (GQA or a mask could send it to the math
    # path, which materialises the scores)
    rep = hq // hkv
    exp_k, exp_v = full_k.repeat_interleave(rep, 1), full_v.repeat_interleave(rep, 1)
    del full_k, full_v

    def reencode():
        return F.scaled_dot_product_attention(full_q, exp_k, exp_v, is_causal=True)

    def masked():
        return F.scaled_dot_product_attention(q_t, exp_k, exp_v, attn_mask=mask)

    # correctness: the dense float64 reference on the first sequences
    n_chk = min(b, 4)
    ref = dense.attention(q[:n_chk], k[:n_chk], v[:n_chk], pk, pv, d ** -0.5, None)[0]
    o, lse = cascade()
    o_re = reencode()[:n_chk, :, p:].transpose(1, 2)
    err = (o[:n_chk].float() - ref).abs().max().item()
    err_sdpa = (o_re.float() - ref).abs().max().item()
    ok = err <= 2 * err_sdpa + 1e-5 and torch.isfinite(lse).all().item()
    if not ok:
        failures.append(f"B{b} S{s} Hq{hq} Hkv{hkv} D{d} P{p} {dtype}: cascade err {err:.3e} "
                        f"vs sdpa {err_sdpa:.3e} (or non-finite lse)")

    row = {"shape": f"B={b} S={s} Hq={hq} Hkv={hkv} D={d} P={p}", "dtype": str(dtype).replace("torch.", "")}
    row["cascade_ms"] = time_ms(cascade)
    row["reencode_ms"] = time_ms(reencode)
    row["masked_ms"] = time_ms(masked)
    row["cascade_mib"] = peak_mib(cascade)
    row["reencode_mib"] = peak_mib(reencode)
    # useful FLOPs: suffix queries x (prefix + causal own keys), QK and PV
    flops = 4 * b * hq * d * s * (p + (s + 1) / 2)
    row["cascade_tflops"] = flops / row["cascade_ms"] / 1e9
    row["err"] = err
    row["err_sdpa"] = err_sdpa
    return row


def bench_merge(b, s, h, d, dtype, failures):
    from copsd import backends
    from copsd.ops.attention import merge_attention_states

    o_a = torch.randn(b, s, h, d, device=DEVICE, dtype=dtype)
    o_b = torch.randn(b, s, h, d, device=DEVICE, dtype=dtype)
    lse_a = torch.randn(b, h, s, device=DEVICE) * 4
    lse_b = torch.randn(b, h, s, device=DEVICE) * 4
    o_ref, _ = dense.merge_attention_states(o_a, lse_a, o_b, lse_b)
    rows = []
    for name in ("triton", "cuda"):
        if name not in backends.available_backends():
            rows.append({"backend": name, "note": "not available"})
            continue
        fn = lambda: merge_attention_states(o_a, lse_a, o_b, lse_b, backend=name)  # noqa: B023
        o, lse = fn()
        err = (o.double() - o_ref).abs().max().item()
        if err > 2 * torch.finfo(dtype).eps * (1 + o_ref.abs().max().item()):
            failures.append(f"merge {name} {dtype}: error {err:.3e}")
        ms = time_ms(fn)
        nbytes = 3 * o_a.numel() * o_a.element_size() + 3 * lse_a.numel() * 4
        rows.append({"backend": name, "ms": ms, "GB/s": nbytes / ms / 1e6, "err": err})
    return rows


def main(argv=None):
    global DEVICE
    ap = arg_parser(__doc__)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks this script, not a benchmark")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    DEVICE = gpu_or_smoke("bench_attention_gpu", smoke)
    if DEVICE is None:
        return 0
    meta = run_meta(DEVICE, dtype="bfloat16")
    if smoke:
        meta["device"] = "CPU smoke run (not a benchmark)"
    print(f"# cascade attention benchmark  {meta['date']}")
    print(f"# device {meta['device']}  torch {meta['torch']}  triton {meta.get('triton', '-')}  "
          f"python {meta['python']}")
    failures = []
    rows = []
    cases = [  # (B, S, Hq, Hkv, D, P): 1B-class Llama heads (32/8, D=64); the teacher-scoring shape first
        (256, 512, 32, 8, 64, 2048),
        (16, 512, 32, 8, 128, 2048),
        (64, 128, 32, 8, 64, 4096),
    ]
    merge_shape = (256, 512, 32, 64)
    if smoke:
        cases = [(3, 16, 4, 2, 16, 40), (2, 9, 4, 4, 32, 0)]
        merge_shape = (2, 8, 4, 16)
    print("| shape | dtype | cascade ms | SDPA re-encode ms | SDPA masked ms | speedup vs re-encode "
          "| cascade TFLOPS | peak MiB cascade / re-encode | max err (cascade / SDPA bf16) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in cases:
        r = bench_case(*case, torch.bfloat16, failures)
        rows.append(r)
        print(f"| {r['shape']} | {r['dtype']} | {r['cascade_ms']:.3f} | {r['reencode_ms']:.3f} | "
              f"{r['masked_ms']:.3f} | {r['reencode_ms'] / r['cascade_ms']:.2f}x | "
              f"{r['cascade_tflops']:.0f} | "
              f"{r['cascade_mib']:.0f} / {r['reencode_mib']:.0f} | {r['err']:.2e} / {r['err_sdpa']:.2e} |",
              flush=True)
    print(f"\n| merge o {list(merge_shape)} bf16 | ms | GB/s | max err |")
    print("|---|---|---|---|")
    merge_rows = bench_merge(*merge_shape, torch.bfloat16, failures)
    write_json(os.path.join(args.out, "bench_attention_gpu.json"),
               dict(meta=meta, cases=rows, merge=merge_rows, failures=failures))
    for r in merge_rows:
        if "note" in r:
            print(f"| {r['backend']} | {r['note']} | | |")
        else:
            print(f"| {r['backend']} | {r['ms']:.3f} | {r['GB/s']:.0f} | {r['err']:.2e} |")
    if failures:
        print("\nFAILED checks:\n  " + "\n  ".join(failures))
        return 1
    print("\nall outputs checked against the dense float64 reference: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
