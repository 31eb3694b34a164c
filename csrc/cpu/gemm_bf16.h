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

// ---- The gradient GEMMs on the same dot products (COPSD_CPU_BF16_GEMM=all; gemm.cpp).  Both reduce over a dimension
// other than the hidden one, so their operands are packed as pairs along that dimension: d_hidden[r, h] =
// sum_v G[r, v] W[v, h] pairs G's row entries and W's rows (pack_row_pairs_bf16); d_weight[v, h] = sum_r G[r, v]
// x[r, h] pairs G's rows and x's rows (pack_row_pairs); pack_grad writes both layouts of G.  G (dL/dz, fp32) is
// rounded to bf16 there; x and W are bf16 values already.

// Columns of a B operand rounded up to whole panels: gemm_words reads every panel whole.
inline int64_t padded(int64_t cols) { return panels(cols) * kPanel; }
// The row stride (words) of a pair-packed operand of `cols` columns: whole panels plus one cache line, so that the
// pair rows a block walks down (1-2 KiB apart at H = 256-512) do not all fall into the same few L1 sets.
inline int64_t pair_stride(int64_t cols) { return padded(cols) + 16; }

// out[k * ldo + c] = the pair (src[2k][c], src[2k + 1][c]) rounded to bf16 (an odd last row paired with 0), for
// k < pairs(rows), c < cols; words cols..ldo of each pair row are 0 (ldo >= cols).
void pack_row_pairs(const float* src, int64_t ld, int64_t rows, int64_t cols, uint32_t* out, int64_t ldo);
// The same from bf16 bits (no rounding).
void pack_row_pairs_bf16(const uint16_t* src, int64_t ld, int64_t rows, int64_t cols, uint32_t* out, int64_t ldo);

// G's two layouts from one read of src (fp32 [rows, cols], row stride ld), rounded to bf16: by_col[r * ldc + k] =
// the pair (src[r][2k], src[r][2k + 1]) for k < pairs(cols) (an odd last entry paired with 0), and by_row as
// pack_row_pairs(src, ld, rows, cols, by_row, ldr) leaves it.
void pack_grad(const float* src, int64_t ld, int64_t rows, int64_t cols, uint32_t* by_col, int64_t ldc,
               uint32_t* by_row, int64_t ldr);

// C[m, ncols] = (add: +=) A B, A's words at a[i * si + k * sk] (row i < m, pair k < K2), B's at b[k * sb + c]: every
// B row must hold padded(ncols) readable words (the pad's columns are computed and never stored).  Products and
// sums as the logits GEMM's (two-level fp32 sums).  Single-threaded.
void gemm_words(const uint32_t* a, int64_t si, int64_t sk, int64_t m, const uint32_t* b, int64_t sb, int64_t ncols,
                int64_t K2, float* C, int64_t ldc, bool add);

}  // namespace bf16dot
}  // namespace copsd_cpu
