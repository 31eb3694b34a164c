// The blocking of the fp32 logits GEMM (gemm_f32.h), shared by its AVX-512 and AVX2 kernels.  Include it only after
// the file's `#pragma GCC target(...)`: Kernel is the file's own micro-kernel and pack type (in its anonymous
// namespace), so each file's instantiation is its own and compiled for its target.
#pragma once

#include <cstdint>

namespace copsd_cpu {
namespace f32dot {

// Reduction depth per pass over C: a packed 64-row panel of kKBlock columns is 256 KiB, which stays in L2 with the
// row block.
constexpr int64_t kKBlock = 1024;
// Bytes of x per row block (kept in L2 while the panels stream past it).
constexpr int64_t kRowBlockBytes = int64_t(512) << 10;

// C[0..m, panels p0..p1) = x W^T through Kernel::rows(mr, x, ldx, b, kk, C, ldc, nn, add), which computes an
// mr x Panel block (mr <= kRows, nn <= Panel of its columns stored) from kk columns of x and of the packed panel b.
template <int64_t Panel, typename Kernel>
inline void blocked_gemm(const float* x, int64_t ldx, int64_t m, const float* w, int64_t n, int64_t K, int64_t p0,
                         int64_t p1, float* C, int64_t ldc) {
  if (m <= 0 || p0 >= p1) return;
  if (K == 0) {
    const int64_t end = n < p1 * Panel ? n : p1 * Panel;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t v = p0 * Panel; v < end; ++v) C[i * ldc + v] = 0.0f;
    return;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
    const int64_t kk = K - k0 < kKBlock ? K - k0 : kKBlock;
    // Rows per block: a multiple of kRows whose kk columns of x fill about kRowBlockBytes.
    int64_t mb = kRowBlockBytes / (kk * 4) / kRows * kRows;
    if (mb < kRows) mb = kRows;
    for (int64_t r0 = 0; r0 < m; r0 += mb) {
      const int64_t r1 = m < r0 + mb ? m : r0 + mb;
      for (int64_t p = p0; p < p1; ++p) {
        const float* b = w + p * K * Panel + k0 * Panel;
        const int64_t nn = n - p * Panel < Panel ? n - p * Panel : Panel;
        for (int64_t r = r0; r < r1; r += kRows)
          Kernel::rows(r1 - r < kRows ? r1 - r : kRows, x + r * ldx + k0, ldx, b, kk, C + r * ldc + p * Panel, ldc,
                       nn, k0 > 0);
      }
    }
  }
}

// Reduction depth per pass over C in blocked_gemm_nn, whose reductions are long (a vocabulary tile, a chunk's rows):
// each pass's sums are added into C, so a sum runs over at most this many products before it is rounded into C (as
// blocked BLAS GEMMs do), which keeps its error near MKL's (a 1024-deep pass left 3-4x MKL's error at K = 2048).
constexpr int64_t kKBlockNN = 256;

// C[0..m, 0..n) (add: +=, else =) A B for A[i, k] at a[i * sam + k * sak] and B [K, n] row-major (row stride ldb),
// both read in place, n a multiple of Panel, through Kernel::rows_nn(mr, a, sam, sak, b, ldb, kk, C, ldc, add) (an
// mr x Panel block from kk steps of the reduction).  The blocking of blocked_gemm with reduction blocks of kKBlockNN,
// row blocks of A of about kRowBlockBytes (kept in L2) against one Panel-wide column block of B at a time.
template <int64_t Panel, typename Kernel>
inline void blocked_gemm_nn(const float* a, int64_t sam, int64_t sak, int64_t m, const float* b, int64_t ldb,
                            int64_t n, int64_t K, float* C, int64_t ldc, bool add) {
  if (m <= 0 || n <= 0) return;
  if (K == 0) {
    if (!add)
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) C[i * ldc + j] = 0.0f;
    return;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kKBlockNN) {
    const int64_t kk = K - k0 < kKBlockNN ? K - k0 : kKBlockNN;
    int64_t mb = kRowBlockBytes / (kk * 4) / kRows * kRows;
    if (mb < kRows) mb = kRows;
    for (int64_t r0 = 0; r0 < m; r0 += mb) {
      const int64_t r1 = m < r0 + mb ? m : r0 + mb;
      for (int64_t j0 = 0; j0 < n; j0 += Panel)
        for (int64_t r = r0; r < r1; r += kRows)
          Kernel::rows_nn(r1 - r < kRows ? r1 - r : kRows, a + r * sam + k0 * sak, sam, sak, b + k0 * ldb + j0, ldb,
                          kk, C + r * ldc + j0, ldc, add || k0 > 0);
    }
  }
}

// Panels [p0, p1) of W ([n, K], row stride ldw) packed into out through Kernel::pack(W rows, ldw, rows, K, panel),
// which packs one panel of `rows` (<= Panel) rows, the rest zero.
template <int64_t Panel, typename Kernel>
inline void pack_panels(const float* W, int64_t ldw, int64_t n, int64_t K, int64_t p0, int64_t p1, float* out) {
  for (int64_t p = p0; p < p1; ++p)
    Kernel::pack(W + p * Panel * ldw, ldw, n - p * Panel < Panel ? n - p * Panel : Panel, K, out + p * K * Panel);
}

}  // namespace f32dot
}  // namespace copsd_cpu
