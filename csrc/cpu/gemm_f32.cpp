// The fp32 logits GEMM's AVX-512 kernels (see gemm_f32.h), compiled for AVX-512F; gemm.cpp calls them only where the
// CPU has it (isa_level() 2).  Only standard headers are included (before the pragma), see loss_rows_avx2.cpp.
#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "gemm_f32.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
// GCC 12 flags the intrinsics' own "undefined" vectors (avx512fintrin.h, GCC bug 105593): false.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "gemm_f32_loop.h"
#include "simd512.h"

namespace copsd_cpu {
namespace f32dot {
namespace avx512 {

namespace {

constexpr int64_t kPanel = 64;
constexpr int kVecs = static_cast<int>(kPanel / 16);

// One R x kPanel block (R <= kRows): C[0..R, 0..nn) = (add: +=) sum over K of a[i * sam + k * sak] times
// b[k * ldb + 0..kPanel).  The logits read x's rows (sak 1) against a packed panel (ldb kPanel); the gradient
// products (gemm_nn) read both operands in place.
template <int R>
__attribute__((always_inline)) inline void block(const float* a, int64_t sam, int64_t sak, const float* b, int64_t ldb,
                                                 int64_t K, float* C, int64_t ldc, int64_t nn, bool add) {
  __m512 acc[R][kVecs];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < kVecs; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 bv[kVecs];
    for (int j = 0; j < kVecs; ++j) bv[j] = _mm512_loadu_ps(b + k * ldb + 16 * j);
    for (int i = 0; i < R; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * sam + k * sak]);
      for (int j = 0; j < kVecs; ++j) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
  simd512::store_rows<R, kVecs>(acc, C, ldc, nn, add);
}

// mr (<= kRows) rows of block; inlined into each caller, so the logits' constant strides reach the loop.
__attribute__((always_inline)) inline void rows_of(int64_t mr, const float* a, int64_t sam, int64_t sak,
                                                   const float* b, int64_t ldb, int64_t K, float* C, int64_t ldc,
                                                   int64_t nn, bool add) {
  static_assert(kRows == 6, "one case per row count below");
  switch (mr) {
    case 6: block<6>(a, sam, sak, b, ldb, K, C, ldc, nn, add); break;
    case 5: block<5>(a, sam, sak, b, ldb, K, C, ldc, nn, add); break;
    case 4: block<4>(a, sam, sak, b, ldb, K, C, ldc, nn, add); break;
    case 3: block<3>(a, sam, sak, b, ldb, K, C, ldc, nn, add); break;
    case 2: block<2>(a, sam, sak, b, ldb, K, C, ldc, nn, add); break;
    default: block<1>(a, sam, sak, b, ldb, K, C, ldc, nn, add); break;
  }
}

struct Kernel {
  static void pack(const float* W, int64_t ldw, int64_t rows, int64_t K, float* o);
  static void rows_nn(int64_t mr, const float* a, int64_t sam, int64_t sak, const float* b, int64_t ldb, int64_t K,
                      float* C, int64_t ldc, bool add) {
    rows_of(mr, a, sam, sak, b, ldb, K, C, ldc, kPanel, add);
  }
  static void rows(int64_t mr, const float* x, int64_t ldx, const float* b, int64_t K, float* C, int64_t ldc,
                   int64_t nn, bool add) {
    rows_of(mr, x, ldx, 1, b, kPanel, K, C, ldc, nn, add);
  }
};

// Kernel::pack: one panel, `rows` (<= kPanel) rows of W into o ([K][kPanel] floats, rows past `rows` 0).  A whole
// panel moves 16 rows x 16 columns at a time through transpose16; the rest value by value.
void Kernel::pack(const float* W, int64_t ldw, int64_t rows, int64_t K, float* o) {
  int64_t done = 0;  // columns packed by the vector loop (all rows)
  if (rows == kPanel) {
    done = K / 16 * 16;
    for (int64_t g = 0; g < kPanel; g += 16)
      for (int64_t k0 = 0; k0 < done; k0 += 16) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_castps_si512(_mm512_loadu_ps(W + (g + i) * ldw + k0));
        simd512::transpose16(r);
        for (int j = 0; j < 16; ++j) _mm512_storeu_ps(o + (k0 + j) * kPanel + g, _mm512_castsi512_ps(r[j]));
      }
  }
  for (int64_t j = 0; j < kPanel; ++j) {
    const float* row = W + j * ldw;
    for (int64_t k = done; k < K; ++k) o[k * kPanel + j] = j < rows ? row[k] : 0.0f;
  }
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

}  // namespace avx512
}  // namespace f32dot
}  // namespace copsd_cpu

#else  // not x86-64 GCC/Clang: never called (f32_gemm_level() is 0)

namespace copsd_cpu {
namespace f32dot {
namespace avx512 {
void pack_w(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, float*) {}
void gemm(const float*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t) {}
void gemm_nn(const float*, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, float*, int64_t, bool) {}
}  // namespace avx512
}  // namespace f32dot
}  // namespace copsd_cpu

#endif
