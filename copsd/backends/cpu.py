"""C++ CPU backend (extension ``copsd._C``, sources in ``csrc/cpu``).

Tokens are processed in row chunks: one GEMM per chunk and side (copsd's own fp32 or bf16 kernel where the CPU
has one, else ATen/MKL) writes full-vocabulary rows into a reusable ``[rows, V]`` workspace, the fused C++
epilogue reduces
each row (online max/sum-exp, entropy, divergence accumulators, running top-k) in parallel
over rows, and when gradients are wanted it leaves ``dLoss/dlogits`` in the same buffer so two
more GEMMs give ``d_hidden`` and accumulate ``d_weight`` in fp32.  A loss plus its gradient
therefore costs the four GEMMs of the naive computation, and memory stays at
``WORKSPACE_BYTES`` (at least one vocabulary row per side) instead of ``[N, V]``.

Top-k and the log-prob passes are tiled further: each thread forms its row group's logits one vocabulary tile
at a time and scans the tile while it is in cache, so no ``[rows, V]`` block is written at all (see
``docs/kernels.md``).

Every chunk's logits GEMM multiplies the same lm_head, which a BLAS re-packs into its panel layout on each
call.  Where torch's MKL exports its packed-GEMM API (looked up at run time; other BLAS builds simply lack
it) an fp32 lm_head is packed once per op call and all chunks reuse the packed copy; a bf16/fp16 lm_head that
gets gradients is up-cast once per call into one fp32 copy (packed from it) instead of per chunk.  Packing
applies only when a call has >= 2 chunks, in fp32 (fp64 always runs ``at::mm_out`` per chunk), and within the
budget below; results are the same up to fp32 rounding (see ``docs/kernels.md``).

Environment knobs (the ``PACK`` ones are read on every op call):

* ``COPSD_CPU_WORKSPACE_MB`` (default: sized per call): logits workspace of a call (both sides' ``[rows, V]``
  buffers); it also bounds the block up-cast buffer of a low-precision lm_head.  Unset, it is 64 MiB, or for a
  vocabulary too large to keep 256 rows per side in that (128 without gradient GEMMs; fewer when the call has
  fewer tokens) what those rows need, up to 512 MiB: each chunk streams the whole lm_head from memory again, which
  at a 150k vocabulary cost 1.6-1.7x the GEMM floor with the 55-row chunks of 64 MiB (``docs/kernels.md``).  Set,
  it is used as given (``64`` for the smallest footprint).  Where the lm_head is packed, a chunk also has at most
  256 rows (passes with gradient GEMMs) or 128 (top-k, forward log-probs): with the weight packed once, larger
  chunks no longer pay.
* ``COPSD_CPU_PACK`` (default 1): ``0`` turns packing off (one ``at::mm_out`` per chunk, up-casts per chunk).
* ``COPSD_CPU_PACK_MB`` (default 192): MiB that a call's packed lm_head copies and whole fp32 copies of
  low-precision lm_heads may occupy.  A packed copy counts as the fp32 weight's size (``V * H * 4``): MKL
  reserves more (~85 MiB per lm_head at V = 32000, H = 256 or 512) but writes only that, and the rest never
  becomes resident.  The default packs both lm_heads of a divergence at V = 32000 up to H = 768 in fp32 and in
  bf16.  An lm_head that does not fit (the teacher's is considered after the student's) runs unpacked.
* ``COPSD_CPU_UPCAST_COPY`` (default off; read on every call): ``1`` keeps one whole fp32 copy of a bf16 / fp16
  lm_head that gets gradients on the fp32 GEMMs (CPUs without AVX512-BF16, or ``COPSD_CPU_BF16_GEMM=0``), inside
  the pack budget, for its ``d_hidden`` products, instead of up-casting its rows again per tile and chunk: 0-2.4 %
  faster, ``V * H * 4`` bytes more at the peak (``docs/kernels.md``).
* ``COPSD_CPU_TOPK_TILE`` (default: 2048 in fp32, i.e. ~1 MiB per ``[rows, tile]`` block): vocabulary
  entries per tile of the tiled top-k, whose logits are formed and scanned one tile at a time while they are
  in L2 (the lm_head is packed per tile); read on every call.
* ``COPSD_CPU_CACHE_MB`` (default 256; read on every call): MiB of large buffers (>= 1 MiB: workspaces, packed
  and up-cast lm_head copies, per-thread tiles, the returned gradients once freed) kept between calls, so that
  the next call of the same shapes finds them resident instead of paying a page fault per 4 KiB (13-30 thousand
  faults and up to a quarter of the time of a bf16 JSD call at N = 2048, V = 32000 on a 2-core Zen 4 VM).  The
  bound counts kept and in-use buffers together; the least recently kept go first.  ``0`` keeps nothing (the
  smallest footprint).  :func:`empty_cache` frees them now, :func:`cache_stats` counts hits, misses, held bytes.
* ``COPSD_CPU_BF16_GEMM`` (read on every call; on a CPU with AVX512-BF16, see :func:`bf16_gemm_available`):
  ``1`` (default) forms the logits of bf16 inputs (bf16 hidden states and lm_head) on the backend's bf16
  dot-product kernel, fp32 products and sums, as accurate as the fp32 GEMM; ``all`` puts their gradient GEMMs
  there too, with ``dL/dz`` rounded to bf16 (about twice as fast; gradients within a few times the rounding error
  of a bf16 result, far below plain bf16 PyTorch's: ``docs/kernels.md``); ``0`` keeps every GEMM in fp32.
* ``COPSD_CPU_F32_GEMM`` (read on every call): unset, empty or ``auto``, fp32 logits run on copsd's own fp32 GEMM
  kernel (AVX-512 or AVX2 + FMA, from an lm_head packed once per call) where it measured at least about as fast as
  MKL's GEMM on this machine (once per process, ~0.2 s, on the first call that asks; :func:`f32_gemm_calibration`;
  ``COPSD_CPU_F32_GEMM_KEEP``, default 1.05, is how much faster MKL must be to be chosen, read at the measurement);
  ``1`` forces the kernel anywhere it is built for the CPU, ``0`` keeps MKL (see :func:`f32_gemm_available`).
  On AVX-512 CPUs the fp32 gradient GEMMs of each vocabulary tile (``d_hidden``, ``d_weight``) run on it too, where
  the hidden size is a multiple of 64 and they measured at least about as fast as MKL's (the same measurement);
  ``COPSD_CPU_F32_GRADS`` (read on every call) ``1`` / ``0`` forces them on / off.
* ``COPSD_CPU_SIDE_GEMMS``, ``COPSD_CPU_GRAD_TILES``, ``COPSD_CPU_DYNAMIC`` (default on; read on every call, for
  A/B measurements): ``0`` turns off, in that order, the logits GEMMs that each thread runs on its own rows (the
  student's and teacher's side by side), the gradient GEMMs per vocabulary tile, and the dynamic hand-out of
  both (one fixed share per thread instead).
* ``COPSD_CPU_TEAM`` (default on; read on every call, for A/B measurements): ``0`` runs a divergence's chunks as
  separate OpenMP regions instead of on one team of threads whose waiting threads sleep after a short spin (the
  team needs the default tiled path: see docs/kernels.md, "CPU threads on a shared machine").
* ``COPSD_CPU_ISA`` (``base|avx2|avx512``, any case; unset or ``native``: no cap) caps the instruction set of the
  row epilogues and of copsd's GEMM kernels (read once per process; another value is an error on the first op
  call); ``COPSD_CPU_PROFILE=1`` prints each call's logits-GEMM / epilogue / gradient-GEMM split (the one-time
  packing counts as logits).

Every on/off knob takes ``1``/``0``, ``true``/``false``, ``on``/``off`` or ``yes``/``no`` (any case); another
value is an error naming the variable.

Kernel-level interface: see the docstring of :mod:`copsd.backends`.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from copsd.ops._spec import DivergenceSpec, LogitSpec

NAME = "cpu"


def _workspace_bytes():
    raw = os.environ.get("COPSD_CPU_WORKSPACE_MB", "")
    if raw == "":
        return 0  # the default: sized per call by the C++ side (workspace_budget)
    try:
        mb = int(raw)
    except ValueError:
        mb = 0
    if mb < 1:
        raise ValueError(f"COPSD_CPU_WORKSPACE_MB must be a positive integer (MiB), got {raw!r}")
    return mb << 20


# Bytes of logits workspace per call (the [rows, V] buffers of both sides); also bounds the
# per-block fp32 copy of a low-precision lm_head.  0 (COPSD_CPU_WORKSPACE_MB unset) lets the C++ side size it per
# call: 64 MiB, which keeps 256 rows of a 32k vocabulary per side (efficient GEMMs, far below [N, V]; the rows are
# capped further where the lm_head is packed), grown up to 512 MiB where a larger vocabulary would leave fewer rows
# than that.  At least one vocabulary row per side is always used.
WORKSPACE_BYTES = _workspace_bytes()

_KIND = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2}
_SUPPORT = {"full": 0, "teacher_topk": 1}
_TAIL = {"bucket": 0, "renorm": 1, "none": 2}

try:
    from copsd import _C

    _C_ERROR = None
except ImportError as e:  # not built (COPSD_SKIP_NATIVE=1 or no compiler), or built but broken
    _C, _C_ERROR = None, e


def missing():
    if _C is not None:
        return None
    if importlib.util.find_spec("copsd._C") is None:
        return "the C++ extension copsd._C is not built (COPSD_SKIP_NATIVE=1 or no compiler at install time)"
    raise ImportError(f"the C++ extension copsd._C is built but does not load: {_C_ERROR}") from _C_ERROR


def available():
    return _C is not None


def supports(op, device):
    return torch.device(device).type == "cpu"


def empty_cache():
    """Free the large buffers the C++ backend keeps between calls (see ``COPSD_CPU_CACHE_MB`` above); buffers in
    use (a gradient still held as ``.grad``) stay with their tensors and return to the cache when freed."""
    if _C is not None:
        _C.empty_cache()


def cache_stats():
    """The buffer cache's counters: ``hits`` / ``misses`` (buffers >= 1 MiB found / allocated), ``held_bytes`` /
    ``held_blocks`` (free buffers kept), ``in_use_bytes`` (buffers now owned by live tensors)."""
    return dict(_C.cache_stats()) if _C is not None else {}


def isa():
    """Instruction set the C++ row epilogues use here ("avx512", "avx2" or "base")."""
    return _C.isa()


def bf16_gemm_available():
    """Whether bf16 logits run on the backend's AVX512-BF16 dot-product kernel here (the CPU has it and
    ``COPSD_CPU_ISA`` does not cap the level below avx512; ``COPSD_CPU_BF16_GEMM=0`` still turns it off per call,
    ``COPSD_CPU_BF16_GEMM=all`` puts the gradient GEMMs there too)."""
    return bool(_C.bf16_gemm_available())


def f32_gemm_available():
    """Whether fp32 logits run on the backend's own fp32 GEMM kernel here: the CPU has AVX2 + FMA or AVX-512
    (capped by ``COPSD_CPU_ISA``) and ``COPSD_CPU_F32_GEMM`` is ``1``, or unset / ``auto`` and the kernel measured
    at least about as fast as MKL's GEMM here (:func:`f32_gemm_calibration`); read now, as every call reads it."""
    return bool(_C.f32_gemm_available())


def f32_gemm_calibration():
    """The measurement behind ``COPSD_CPU_F32_GEMM``'s default, made once per process (now, if no call made it yet).

    One chunk-logits block ([256, 256] x [2048, 256]^T, fp32) per thread, all threads at once, each single-threaded,
    on the kernel and on MKL's packed GEMM, interleaved over a few rounds; the best round of each is kept.  Returns a
    dict: ``level`` (the kernel's ISA level: 2 AVX-512, 1 AVX2, 0 none and nothing measured), ``measured``,
    ``kernel_s`` / ``mkl_s`` (seconds), ``agree`` (the two products agreed), ``keep`` (the kernel is kept unless
    MKL is faster than ``kernel_s / keep``) and ``kernel`` (the default takes the kernel); at level 2 also the tile
    gradient products' (``d_hidden = G W``, ``d_weight = G^T x`` on each thread's block): ``grads_kernel_s``,
    ``grads_mkl_s``, ``grads_agree`` and ``grads`` (``COPSD_CPU_F32_GRADS``'s default takes the kernel)."""
    return dict(_C.f32_gemm_calibration())


def f32_gemm_summary():
    """One line: whether fp32 logits take the kernel here and the measurement behind the defaults (``copsd info``, the
    CPU benchmarks' headers)."""
    on = "yes" if f32_gemm_available() else "no"
    cal = f32_gemm_calibration()
    if not cal["measured"]:
        return f"{on} (no kernel at this ISA level)"
    out = (f"{on} (measured: kernel {cal['kernel_s'] * 1e3:.2f} ms, MKL {cal['mkl_s'] * 1e3:.2f} ms per block; "
           f"COPSD_CPU_F32_GEMM={os.environ.get('COPSD_CPU_F32_GEMM', 'unset')})")
    if cal["level"] == 2:
        out += (f"; gradient products: {'kernel' if cal['grads'] else 'MKL'} by default (kernel "
                f"{cal['grads_kernel_s'] * 1e3:.2f} ms, MKL {cal['grads_mkl_s'] * 1e3:.2f} ms; "
                f"COPSD_CPU_F32_GRADS={os.environ.get('COPSD_CPU_F32_GRADS', 'unset')})")
    return out


def _logit_args(logit: LogitSpec):
    return float(logit.temperature), float(logit.logit_scale), (
        None if logit.softcap is None else float(logit.softcap))


def logprobs_forward(hidden, weight, ids, logit: LogitSpec):
    return _C.logprobs_forward(hidden, weight, ids.long(), *_logit_args(logit), WORKSPACE_BYTES)


def logprobs_backward(hidden, weight, ids, lse, entropy, g_logprobs, g_entropy, g_lse, logit: LogitSpec):
    return _C.logprobs_backward(hidden, weight, ids.long(), lse, entropy, g_logprobs, g_entropy, g_lse,
                                *_logit_args(logit), WORKSPACE_BYTES)


def logprobs_loss(hidden, weight, ids, logit: LogitSpec, coeff):
    """A per-token loss of the log-probs / entropies with its gradient taken in the forward pass: the C++
    driver keeps each token chunk's logits between the row statistics and the row gradients (3 GEMMs).
    ``coeff(r0, rows, lp, ent)`` returns the chunk's (d loss / d lp, d loss / d ent).  Returns
    ``(lp, ent, d_hidden, d_weight)``."""
    return _C.logprobs_loss(hidden, weight, ids.long(), coeff, *_logit_args(logit), WORKSPACE_BYTES)


def topk(hidden, weight, k, logit: LogitSpec):
    return _C.topk(hidden, weight, int(k), *_logit_args(logit), WORKSPACE_BYTES)


def divergence(s_hidden, s_weight, t_hidden, t_weight, logit: LogitSpec, div: DivergenceSpec,
               topk_ids=None, token_grad=None):
    return _divergence(s_hidden, s_weight, t_hidden, t_weight, logit, div, topk_ids, token_grad, None, 0)[:3]


def divergence_stats(s_hidden, s_weight, t_hidden, t_weight, logit: LogitSpec, div: DivergenceSpec,
                     topk_ids, token_grad, stats_ids):
    """``divergence`` plus, from the rows the epilogue already holds (no extra GEMM), the student's log-prob of
    ``stats_ids`` and entropy and the teacher's log-prob of ``stats_ids``: ``(loss, dx | None, dw | None,
    stats[3, N])``."""
    return _divergence(s_hidden, s_weight, t_hidden, t_weight, logit, div, topk_ids, token_grad,
                       stats_ids.long().contiguous(), 0)[:4]


def divergence_select(s_hidden, s_weight, t_hidden, t_weight, logit: LogitSpec, div: DivergenceSpec, k: int,
                      token_grad=None, stats_ids=None):
    """The teacher-top-k divergence that selects its support itself: each row's teacher top ``k`` (the ids and
    order ``topk`` would return) is taken from the teacher logits the divergence forms anyway, so the teacher's
    lm_head is multiplied once, not a second time by a top-k pass.  ``(loss, dx | None, dw | None,
    stats[3, N] | None, ids[N, k])``."""
    if div.support != "teacher_topk":
        raise ValueError(f"divergence_select needs div.support == 'teacher_topk', got {div.support!r}")
    sid = None if stats_ids is None else stats_ids.long().contiguous()
    return _divergence(s_hidden, s_weight, t_hidden, t_weight, logit, div, None, token_grad, sid, int(k))


def _divergence(s_hidden, s_weight, t_hidden, t_weight, logit, div, topk_ids, token_grad, stats_ids, select_k):
    if div.support == "teacher_topk" and topk_ids is None and not select_k:
        raise ValueError("topk_ids must be an [N, k] int64 tensor when div.support == 'teacher_topk'")
    ids = topk_ids.long().contiguous() if (topk_ids is not None and div.support == "teacher_topk") else None
    clip = None if div.term_clip is None else float(div.term_clip)
    return _C.divergence(s_hidden, s_weight, t_hidden, t_weight, *_logit_args(logit), _KIND[div.kind],
                         float(div.beta), _SUPPORT[div.support], _TAIL[div.tail], clip, ids, token_grad, stats_ids,
                         select_k, WORKSPACE_BYTES)
