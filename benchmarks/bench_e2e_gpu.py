"""GPU run of the end-to-end step benchmark: ``bench_e2e_cpu.py`` with GPU defaults (one CUDA device, bf16).

copsd:paper, copsd:jsd and trl:distill on a Qwen2-0.5B-shaped random-weight model (hidden 896, 24 layers,
14 query / 2 KV heads, intermediate 4864, vocabulary 151936, tied embeddings; student and teacher initialised on
the GPU in bfloat16 and written to a temporary folder), 4 prompts x G = 8 answers of up to 256 new tokens
(random weights: nearly every answer runs to the cap), one warm-up step per implementation and 2 timed
round-robin rounds.  What is measured and how (stage split with ``torch.cuda.synchronize()`` at every timed
boundary, peak CUDA memory allocated above the step's start, the weights-changed check): ``bench_e2e_cpu.py``'s
docstring.

Files: the Markdown table is appended to ``$OUT/bench_e2e_gpu.md`` and every per-step record written to
``$OUT/bench_e2e_gpu.json`` when ``$OUT`` is set (``benchmarks/gpu_check.sh`` sets it); the table is printed in any
case.  Exit status: 0 on success, and 0 with "skipped: no CUDA device" where torch sees no GPU (nothing is run);
1 when an implementation fails the output check (its warm-up changed no weight, or a non-finite loss).

Run: ``python benchmarks/bench_e2e_gpu.py [bench_e2e_cpu.py arguments ...]`` -- arguments given here override the
defaults (argparse: the last one wins; ``--no-bf16`` for fp32, ``--device cpu`` for a CPU smoke run of this
wrapper with small ``--hidden/--layers/--vocab``).
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

DEFAULTS = ["--device", "cuda", "--bf16",
            "--hidden", "896", "--layers", "24", "--heads", "14", "--kv-heads", "2", "--intermediate", "4864",
            "--vocab", "151936",
            "--prompts", "4", "--G", "8", "--new-tokens", "256",
            "--steps", "2", "--warmup", "1",
            # not trl:gkd: every implementation lives in one process, and GKD's full-vocabulary fp32 JSD
            # (5.4 GiB per [32 x ~290, 151936] tensor, several at once) ran the H200 out of memory beside the
            # others (131.6 GiB allocated, 2026-12-04); name it in --impl to run it alone
            "--impl", "copsd:paper", "copsd:jsd", "trl:distill"]


def _device_asked(argv) -> str:
    """The ``--device`` in effect after the defaults and ``argv`` (the last one given wins)."""
    device = "cuda"
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            device = argv[i + 1]
        elif arg.startswith("--device="):
            device = arg.split("=", 1)[1]
    return device


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import torch

    if _device_asked(argv) == "cuda" and not torch.cuda.is_available():
        print("bench_e2e_gpu: skipped: no CUDA device (torch.cuda.is_available() is False)")
        return 0
    import bench_e2e_cpu

    files = []
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        files = ["--out", os.path.join(out, "bench_e2e_gpu.md"), "--json", os.path.join(out, "bench_e2e_gpu.json")]
    # main() prints the table, writes the files and exits with status 1 when an output check failed
    res = bench_e2e_cpu.main(DEFAULTS + files + argv)
    print(f"bench_e2e_gpu: ok ({', '.join(res['impls'])}; skipped: {', '.join(res['skipped']) or 'none'})"
          + (f"; wrote {files[1]} and {files[3]}" if files else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
