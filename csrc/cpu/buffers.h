// Large per-call buffers of the CPU loss drivers: the [rows, V] logits workspaces, the whole fp32 copy of a bf16
// lm_head, the packed lm_head copies, the per-thread tiles, and the d_hidden / d_weight gradients the ops return
// (a gradient the caller keeps, as .grad, is in use, not held: its block goes back to the cache when it is freed).
//
// A training step calls the same op with the same shapes again and again, and each call used to allocate its
// buffers afresh: glibc hands blocks this large straight to mmap (or trims them from the heap on free), so every
// call paid the kernel a page fault per 4 KiB on first touch.  Measured on a 2-core Zen 4 KVM guest, bf16 JSD
// at N = 2048, H = 256, V = 32000: 13-30 thousand faults and 25-230 ms of system time per ~800 ms call, varying
// from call to call with the heap's history.  So the drivers take these buffers from a small process-wide cache
// instead (cached_empty): a buffer whose tensor is freed goes back to the cache, and the next call of the same
// shapes finds it, already resident.
//
// Bounds: COPSD_CPU_CACHE_MB MiB (default 256, the default pack budget plus the default workspace; 0 turns the
// cache off: every buffer is freed with its tensor), counted as what the blocks occupy (a packed copy's resident
// size, not the larger size MKL reserves).  Kept blocks never take the cache's total (kept and in use) beyond it:
// a call that does not find a buffer of its size first frees the least recently kept ones until the new one fits,
// and a freed buffer that does not fit pushes out the oldest (itself last).  Buffers in use may exceed it (the
// bound never fails a call).  So a process holds at most that much more than without the cache, and ops whose
// calls alternate (log-probs forward, then backward; top-k, then the divergence) all find their buffers when the
// bound holds both sets.  Only blocks of >= 1 MiB are cached.  empty_cache() frees every kept buffer.
#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace copsd_cpu {

// An uninitialised contiguous tensor of `sizes` and `dtype` whose memory comes from the cache (>= 1 MiB) or from
// at::empty (smaller).  `resident`: the bytes of it the caller will touch, when less than all of it (a packed
// MKL copy); the cache's bound counts that.  Thread-safe.
at::Tensor cached_empty(at::IntArrayRef sizes, at::ScalarType dtype, int64_t resident = -1);

// Frees every free cached buffer (buffers in use stay with their tensors).
void empty_cache();

// A large buffer a call allocates afresh (the divergence's [rows, V] workspaces and its [V, H] d_weight, ~32 MiB
// each at V = 32000, H = 256) is first written by a GEMM, and each of its 4 KiB pages then costs the kernel a
// fault: ~8000 faults per buffer, measured 18-22 ms to first-touch 32 MiB against 6-10 ms with 2 MiB pages (one
// thread, loaded 2-core Xeon VM).  Where transparent huge pages are in "madvise" mode (the usual default) the
// buffer's whole 2 MiB pages are marked for them; elsewhere (THP "always" / "never", other systems) nothing
// changes.  Call it before the first write.  Not for a buffer only part of which is written (a packed MKL copy
// writes an inner part of what it reserves: the rest would become resident too), nor for the lm_head up-casts and
// packs (measured slower: docs/kernels.md).  With the cache, only a call that maps a new block pays either way.
void advise_huge_pages(const at::Tensor& t);

void register_buffers(pybind11::module& m);

}  // namespace copsd_cpu
