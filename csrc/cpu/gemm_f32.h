// The fp32 logits GEMM on AVX-512 or AVX2: out[m, n] = x[m, K] @ W[n, K]^T with fp32 operands, products and sums,
// from a copy of W packed once per op call.  Plain C++ only: the kernels are compiled under `#pragma GCC target`
// (gemm_f32.cpp for AVX-512, gemm_f32_avx2.cpp), which must not see torch headers; gemm.cpp decides where they run
// (f32_gemm_use) and drives them.
//
// Why: the chunk logits GEMMs are half of a divergence's floor, and torch's MKL runs them well below the FMA peak
// on AMD CPUs: 69-84 GFLOP/s per thread for a [256, 512] x [512, 32000] product on a 2-core Zen 4, whose two
// threads each reach ~115 GFLOP/s in a loop of independent FMAs (MKL's packed GEMM ~94 in an earlier profile).  This
// kernel ran that product at 100-111 (docs/kernels.md, "CPU fp32 logits on a GEMM kernel of our own").
//
// Layouts.  W is packed into panels of panel_rows(level) vocabulary rows: panel p holds, for each hidden dimension k,
// the values W[v, k] of its rows ([K][panel] floats; rows past n are 0).  x is read in place (row stride ldx, unit
// stride along K).  The micro-kernel keeps a kRows x panel block of C in registers (AVX-512: 24 zmm; AVX2: 12 ymm)
// and adds, per k, one broadcast x[i, k] times the panel's row k.  Blocking (gemm_f32_loop.h): a block of rows of x
// (~512 KiB, kept in L2) against one panel at a time (streamed from memory once per row block); the reduction is
// split into blocks of 1024 (sums continued in C).
#pragma once

#include <cstdint>

namespace copsd_cpu {
namespace f32dot {

constexpr int64_t kRows = 6;  // token rows per micro-kernel block

// The kernels per ISA level (gemm.cpp's isa_level()): 2, AVX-512 (gemm_f32.cpp): panels of 64 vocabulary rows, a
// 6 x 64 block in 24 zmm accumulators; 1, AVX2 + FMA (gemm_f32_avx2.cpp): panels of 16, a 6 x 16 block in 12 ymm.
inline int64_t panel_rows(int level) { return level == 2 ? 64 : 16; }
inline int64_t panels(int level, int64_t n) { return (n + panel_rows(level) - 1) / panel_rows(level); }
// Floats of a packed [n, K] W block.
inline int64_t packed_w_floats(int level, int64_t n, int64_t K) { return panels(level, n) * panel_rows(level) * K; }

// Panels [p0, p1) of the packed copy of W ([n, K] fp32, row stride ldw, unit stride along K) into out (the whole
// block's packed buffer, packed_w_floats(level, n, K) floats).  Single-threaded; callers split the panels over
// threads.
inline void pack_w(int level, const float* W, int64_t ldw, int64_t n, int64_t K, int64_t p0, int64_t p1,
                   float* out);

// C[i, v] (row stride ldc) = sum_k x[i, k] W[v, k] for the m rows of x (row stride ldx) and the vocabulary rows v of
// panels [p0, p1) of a packed block of n rows.  Single-threaded; callers split the panels (or rows) over threads.
inline void gemm(int level, const float* x, int64_t ldx, int64_t m, const float* w, int64_t n, int64_t K,
                 int64_t p0, int64_t p1, float* C, int64_t ldc);

// C[i, j] (add: +=, else =) sum_k A[i, k] B[k, j] for i < m, j < n: A[i, k] at a[i * sam + k * sak] (any strides:
// the gradient GEMMs read dL/dz rows, sak = 1, or its columns, sam = 1, in place), B [K, n] row-major with row
// stride ldb, read in place (no pack), C rows at stride ldc; n a multiple of panel_rows(level).  Single-threaded.
// The gradient GEMMs of a vocabulary tile: d_hidden (+)= G W[tile] and d_weight[tile] (+)= G^T x (gemm.cpp,
// f32_grads_use).
inline void gemm_nn(int level, const float* a, int64_t sam, int64_t sak, int64_t m, const float* b, int64_t ldb,
                    int64_t n, int64_t K, float* C, int64_t ldc, bool add);

namespace avx512 {
void gemm_nn(const float* a, int64_t sam, int64_t sak, int64_t m, const float* b, int64_t ldb, int64_t n, int64_t K,
             float* C, int64_t ldc, bool add);
void pack_w(const float* W, int64_t ldw, int64_t n, int64_t K, int64_t p0, int64_t p1, float* out);
void gemm(const float* x, int64_t ldx, int64_t m, const float* w, int64_t n, int64_t K, int64_t p0, int64_t p1,
          float* C, int64_t ldc);
}  // namespace avx512
namespace avx2 {
void gemm_nn(const float* a, int64_t sam, int64_t sak, int64_t m, const float* b, int64_t ldb, int64_t n, int64_t K,
             float* C, int64_t ldc, bool add);
void pack_w(const float* W, int64_t ldw, int64_t n, int64_t K, int64_t p0, int64_t p1, float* out);
void gemm(const float* x, int64_t ldx, int64_t m, const float* w, int64_t n, int64_t K, int64_t p0, int64_t p1,
          float* C, int64_t ldc);
}  // namespace avx2

inline void pack_w(int level, const float* W, int64_t ldw, int64_t n, int64_t K, int64_t p0, int64_t p1,
                   float* out) {
  if (level == 2) {
    avx512::pack_w(W, ldw, n, K, p0, p1, out);
  } else {
    avx2::pack_w(W, ldw, n, K, p0, p1, out);
  }
}

inline void gemm(int level, const float* x, int64_t ldx, int64_t m, const float* w, int64_t n, int64_t K, int64_t p0,
                 int64_t p1, float* C, int64_t ldc) {
  if (level == 2) {
    avx512::gemm(x, ldx, m, w, n, K, p0, p1, C, ldc);
  } else {
    avx2::gemm(x, ldx, m, w, n, K, p0, p1, C, ldc);
  }
}

inline void gemm_nn(int level, const float* a, int64_t sam, int64_t sak, int64_t m, const float* b, int64_t ldb,
                    int64_t n, int64_t K, float* C, int64_t ldc, bool add) {
  if (level == 2) {
    avx512::gemm_nn(a, sam, sak, m, b, ldb, n, K, C, ldc, add);
  } else {
    avx2::gemm_nn(a, sam, sak, m, b, ldb, n, K, C, ldc, add);
  }
}

}  // namespace f32dot
}  // namespace copsd_cpu
