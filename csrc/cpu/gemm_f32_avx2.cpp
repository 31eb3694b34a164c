// The fp32 logits GEMM's AVX2 kernels (see gemm_f32.h), compiled for AVX2 + FMA; gemm.cpp calls them only where the
// CPU has both (isa_level() >= 1) and AVX-512 is not used.  Only standard headers are included (before the pragma),
// see loss_rows_avx2.cpp.
#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "gemm_f32.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma")

#include "gemm_f32_loop.h"

namespace copsd_cpu {
namespace f32dot {
namespace avx2 {

namespace {

// 16 vocabulary rows per panel: a panel's row k is one 64-byte line, two ymm vectors.
constexpr int64_t kPanel = 16;

// One R x kPanel block (R <= kRows): C[0..R, 0..kPanel) = (add: +=) sum over K of a[i * sam + k * sak] times
// b[k * ldb + 0..kPanel); 12 ymm accumulators, stored whole (a short last panel goes through a local block:
// Kernel::rows).  The logits read x's rows (sak 1) against a packed panel (ldb kPanel); the gradient products
// (gemm_nn) read both operands in place.
template <int R, bool add>
__attribute__((always_inline)) inline void block(const float* a, int64_t sam, int64_t sak, const float* b, int64_t ldb,
                                                 int64_t K, float* C, int64_t ldc) {
  // Named accumulators, not arrays: with `__m256 acc[R]` GCC 12 kept a copy of them on the stack, stored on every k.
  __m256 l0 = _mm256_setzero_ps(), l1 = l0, l2 = l0, l3 = l0, l4 = l0, l5 = l0;
  __m256 h0 = l0, h1 = l0, h2 = l0, h3 = l0, h4 = l0, h5 = l0;
  const float* x0 = a;
  const float* x1 = a + sam;
  const float* x2 = a + 2 * sam;
  const float* x3 = a + 3 * sam;
  const float* x4 = a + 4 * sam;
  const float* x5 = a + 5 * sam;
#define COPSD_ROW(i)                                       \
  if (R > i) {                                             \
    const __m256 av = _mm256_broadcast_ss(x##i + k * sak); \
    l##i = _mm256_fmadd_ps(av, b0, l##i);                  \
    h##i = _mm256_fmadd_ps(av, b1, h##i);                  \
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * ldb), b1 = _mm256_loadu_ps(b + k * ldb + 8);
    COPSD_ROW(0) COPSD_ROW(1) COPSD_ROW(2) COPSD_ROW(3) COPSD_ROW(4) COPSD_ROW(5)
  }
#undef COPSD_ROW
  const __m256 lo[6] = {l0, l1, l2, l3, l4, l5}, hi[6] = {h0, h1, h2, h3, h4, h5};
  for (int i = 0; i < R; ++i) {
    float* c = C + i * ldc;
    _mm256_storeu_ps(c, add ? _mm256_add_ps(_mm256_loadu_ps(c), lo[i]) : lo[i]);
    _mm256_storeu_ps(c + 8, add ? _mm256_add_ps(_mm256_loadu_ps(c + 8), hi[i]) : hi[i]);
  }
}

// mr (<= kRows) rows of block; inlined into each caller, so the logits' constant strides reach the loop.
template <bool add>
__attribute__((always_inline)) inline void rows_of(int64_t mr, const float* a, int64_t sam, int64_t sak,
                                                   const float* b, int64_t ldb, int64_t K, float* C, int64_t ldc) {
  static_assert(kRows == 6, "one case per row count below");
  switch (mr) {
    case 6: block<6, add>(a, sam, sak, b, ldb, K, C, ldc); break;
    case 5: block<5, add>(a, sam, sak, b, ldb, K, C, ldc); break;
    case 4: block<4, add>(a, sam, sak, b, ldb, K, C, ldc); break;
    case 3: block<3, add>(a, sam, sak, b, ldb, K, C, ldc); break;
    case 2: block<2, add>(a, sam, sak, b, ldb, K, C, ldc); break;
    default: block<1, add>(a, sam, sak, b, ldb, K, C, ldc); break;
  }
}

struct Kernel {
  static void pack(const float* W, int64_t ldw, int64_t rows, int64_t K, float* o);
  static void rows_nn(int64_t mr, const float* a, int64_t sam, int64_t sak, const float* b, int64_t ldb, int64_t K,
                      float* C, int64_t ldc, bool add) {
    if (add) {
      rows_of<true>(mr, a, sam, sak, b, ldb, K, C, ldc);
    } else {
      rows_of<false>(mr, a, sam, sak, b, ldb, K, C, ldc);
    }
  }
  static void rows(int64_t mr, const float* x, int64_t ldx, const float* b, int64_t K, float* C, int64_t ldc,
                   int64_t nn, bool add) {
    if (nn == kPanel) {
      if (add) {
        rows_of<true>(mr, x, ldx, 1, b, kPanel, K, C, ldc);
      } else {
        rows_of<false>(mr, x, ldx, 1, b, kPanel, K, C, ldc);
      }
      return;
    }
    // The first nn columns of the block only: computed whole into t (from C's values where adding), copied back.
    alignas(32) float t[kRows * kPanel];
    for (int64_t i = 0; i < mr; ++i)
      for (int64_t j = 0; j < kPanel; ++j) t[i * kPanel + j] = add && j < nn ? C[i * ldc + j] : 0.0f;
    rows_of<true>(mr, x, ldx, 1, b, kPanel, K, t, kPanel);
    for (int64_t i = 0; i < mr; ++i)
      for (int64_t j = 0; j < nn; ++j) C[i * ldc + j] = t[i * kPanel + j];
  }
};

// Kernel::pack: one panel, `rows` (<= kPanel) rows of W into o ([K][kPanel] floats, rows past `rows` 0), 16 row
// streams read in step (the packed copy is made once per op call).
void Kernel::pack(const float* W, int64_t ldw, int64_t rows, int64_t K, float* o) {
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < kPanel; ++j) o[k * kPanel + j] = j < rows ? W[j * ldw + k] : 0.0f;
}

}  // namespace

void pack_w(const float* W, int64_t ldw, int64_t n, int64_t K, int64_t p0, int64_t p1, float* out) {
  pack_panels<kPanel, Kernel>(W, ldw, n, K, p0, p1, out);
}

void gemm(const float* x, int64_t ldx, int64_t m, const float* w, int64_t n, int64_t K, int64_t p0, int64_t p1,
          float* C, int64_t ldc) {
  blocked_gemm<kPanel, Kernel>(x, ldx, m, w, n, K, p0, p1, C, ldc);
}

void gemm_nn(const float* a, int64_t sam, int64_t sak, int64_t m, const float* b, int64_t ldb, int64_t n, int64_t K,
             float* C, int64_t ldc, bool add) {
  blocked_gemm_nn<kPanel, Kernel>(a, sam, sak, m, b, ldb, n, K, C, ldc, add);
}

}  // namespace avx2
}  // namespace f32dot
}  // namespace copsd_cpu

#else  // not x86-64 GCC/Clang: never called (f32_gemm_level() is 0)

namespace copsd_cpu {
namespace f32dot {
namespace avx2 {
void pack_w(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, float*) {}
void gemm(const float*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t) {}
void gemm_nn(const float*, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, float*, int64_t, bool) {}
}  // namespace avx2
}  // namespace f32dot
}  // namespace copsd_cpu

#endif
