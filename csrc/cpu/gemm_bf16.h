// The bf16 logits GEMM: out[m, n] = x[m, K] @ W[n, K]^T with bf16 operands and fp32 products and sums, on CPUs with
// AVX512_BF16 (VDPBF16PS: 16 lanes x 2 bf16 products per instruction, summed in fp32).  Plain C++ only: the kernels
// are compiled under `#pragma GCC target` (gemm_bf16.cpp), which must not see torch headers; gemm.cpp decides where
// they run (bf16_gemm_supported) and drives them.
//
// Why: a bf16 lm_head's logits GEMM otherwise multiplies the weight up-cast to fp32 at the fp32 FMA rate (MKL,
// ~89 GFLOP/s per Zen 4 core); the dot-product instruction does twice the multiply-adds per cycle (~200 GFLOP/s per
// core in this kernel).  The products of two bf16 values are exact in fp32 and the sums are fp32 sums, so the logits
// are as accurate as the up-cast fp32 GEMM's (the instruction flushes denormals: inputs below ~1.2e-38 count as 0).
//
// Layouts.  W is packed once per op call into panels of kPanel vocabulary rows: panel p holds, for each pair of
// hidden dimensions k2 (K rounded up to even, the odd last one paired with 0), the kPanel pairs (W[v, 2 k2],
// W[v, 2 k2 + 1]) of its rows as 32-bit words ([K2][kPanel]; rows past n are 0).  x is packed per GEMM the other
// way round: panels of kRows token rows, [K2][kRows] pairs (rows past m are 0).  The micro-kernel keeps a
// kRows x kPanel fp32 block in 24 zmm accumulators and adds, per pair k2, one broadcast x pair times the four
// vectors of the W panel (a last panel of fewer rows runs a kernel of that many rows).
#pragma once

#include <cstdint>

namespace copsd_cpu {
namespace bf16dot {

constexpr int64_t kPanel = 64;  // vocabulary rows per packed W panel (4 x 16 fp32 lanes; the tiles are x 256)
constexpr int64_t kRows = 6;    // token rows per packed x panel

inline int64_t pairs(int64_t K) { return (K + 1) / 2; }
inline int64_t panels(int64_t n) { return (n + kPanel - 1) / kPanel; }
// 32-bit words of a packed [n, K] W block / of a packed [m, K] x.
inline int64_t packed_w_words(int64_t n, int64_t K) { return panels(n) * kPanel * pairs(K); }
inline int64_t packed_x_words(int64_t m, int64_t K) { return (m + kRows - 1) / kRows * kRows * pairs(K); }

// Panels [p0, p1) of the packed copy of W ([n, K] bf16 bits, row stride ldw) into out (the whole block's packed
// buffer, packed_w_words(n, K) words).  Single-threaded; callers split the panels over threads.
void pack_w(const uint16_t* W, int64_t ldw, int64_t n, int64_t K, int64_t p0, int64_t p1, uint32_t* out);

// x ([m, K] fp32, row stride ldx) rounded to bf16 (exact for values that came from bf16) into out
// (packed_x_words(m, K) words).  Single-threaded.
void pack_x(const float* x, int64_t ldx, int64_t m, int64_t K, uint32_t* out);

// C[m, v] (row stride ldc) = sum_k x[m, k] W[v, k] for the vocabulary rows v of panels [p0, p1) of a packed block of n
// rows.  Single-threaded; callers split the panels over threads.
void gemm(const uint32_t* x, int64_t m, const uint32_t* w, int64_t n, int64_t K, int64_t p0, int64_t p1, float* C,
          int64_t ldc);

// The same from W itself ([n, K] bf16 bits, row stride ldw): each panel is packed into `panel` (packed_w_words(
// kPanel, K) words, the calling thread's) right before its products, while it is in cache.  For an lm_head whose
// packed copy would not fit the pack budget: W is re-packed per call, a panel at a time, and never held whole.
void gemm_streamed(const uint32_t* x, int64_t m, const uint16_t* W, int64_t ldw, int64_t n, int64_t K, int64_t p0,
                   int64_t p1, float* C, int64_t ldc, uint32_t* panel);

}  // namespace bf16dot
}  // namespace copsd_cpu
