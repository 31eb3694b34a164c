// The bf16 logits GEMM's kernels (see gemm_bf16.h), compiled for AVX-512 with AVX512_BF16; gemm.cpp calls them only
// where the CPU has both.  Only standard headers are included (before the pragma), see loss_rows_avx2.cpp.
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "gemm_bf16.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,avx2,fma")
// GCC 12 flags the intrinsics' own "undefined" vectors (avx512fintrin.h, GCC bug 105593) and the partial sums of
// block() (written on the first inner run before any read) as maybe-uninitialized: both false.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "simd512.h"

namespace copsd_cpu {
namespace bf16dot {

namespace {

constexpr int kVecs = static_cast<int>(kPanel / 16);

// Local, not std::min: no standard-library template is instantiated under the pragma (its out-of-line copy could
// be the one the linker keeps for every caller).
inline int64_t lesser(int64_t a, int64_t b) { return a < b ? a : b; }

// fp32 -> bf16 bits, round to nearest even (NaN stays NaN): exact for a value that is a bf16.
inline uint32_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// Pairs per inner sum: the products of each run of kInner pairs are summed in registers from 0 and the runs' sums are
// added in a second sum (in L1), so the rounding grows with kInner + K / (2 kInner), not with K as one running sum
// per output would (at K = 2048 4-7x the fp32 GEMM's largest error).
constexpr int64_t kInner = 64;

// One R x kPanel block (R <= kRows): C[0..R, 0..nn) (+)= A B over K2 pairs, A's words at a[i * si + k * sk] (row i,
// pair k), B's at b[k * sb + c] (pair k, column c < kPanel).  The logits GEMM passes a packed x panel (si 1, sk kRows)
// and a packed W panel (sb kPanel); the gradient GEMMs other layouts (gemm_words).
template <int R>
__attribute__((always_inline)) inline void block(const uint32_t* a, int64_t si, int64_t sk, const uint32_t* b,
                                                 int64_t sb, int64_t K2, float* C, int64_t ldc, int64_t nn, bool add) {
  __m512 acc[R][kVecs];
  alignas(64) float total[R][kPanel];  // in memory: 24 more accumulators would not fit the 32 registers
  for (int64_t k0 = 0; k0 < K2; k0 += kInner) {
    const int64_t k1 = lesser(K2, k0 + kInner);
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < kVecs; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = k0; k < k1; ++k) {
      __m512bh bv[kVecs];
      for (int j = 0; j < kVecs; ++j) bv[j] = (__m512bh)_mm512_loadu_si512(b + k * sb + 16 * j);
      for (int i = 0; i < R; ++i) {
        const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[i * si + k * sk]));
        for (int j = 0; j < kVecs; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[j]);
      }
    }
    if (k1 == K2 && k0 == 0) {
      simd512::store_rows<R, kVecs>(acc, C, ldc, nn, add);
      return;
    }
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < kVecs; ++j) {
        float* t = &total[i][16 * j];
        _mm512_store_ps(t, k0 == 0 ? acc[i][j] : _mm512_add_ps(_mm512_load_ps(t), acc[i][j]));
      }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < kVecs; ++j) acc[i][j] = _mm512_load_ps(&total[i][16 * j]);
  simd512::store_rows<R, kVecs>(acc, C, ldc, nn, add);
}

// The packed logits layout (constant strides, so the row kernels compile as before the generic strides).
void block_rows(int64_t mr, const uint32_t* a, const uint32_t* b, int64_t K2, float* C, int64_t ldc, int64_t nn) {
  static_assert(kRows == 6, "one case per row count below");
  switch (mr) {
    case 6: block<6>(a, 1, kRows, b, kPanel, K2, C, ldc, nn, false); break;
    case 5: block<5>(a, 1, kRows, b, kPanel, K2, C, ldc, nn, false); break;
    case 4: block<4>(a, 1, kRows, b, kPanel, K2, C, ldc, nn, false); break;
    case 3: block<3>(a, 1, kRows, b, kPanel, K2, C, ldc, nn, false); break;
    case 2: block<2>(a, 1, kRows, b, kPanel, K2, C, ldc, nn, false); break;
    default: block<1>(a, 1, kRows, b, kPanel, K2, C, ldc, nn, false); break;
  }
}

// C[0..m, 0..nn) = every row panel of the packed x times one packed W panel b.
void rows_times_panel(const uint32_t* x, int64_t m, const uint32_t* b, int64_t K2, float* C, int64_t ldc, int64_t nn) {
  for (int64_t r0 = 0; r0 < m; r0 += kRows)
    block_rows(lesser(kRows, m - r0), x + r0 * K2, b, K2, C + r0 * ldc, ldc, nn);
}

// Any strides (gemm_words).
void block_rows_any(int64_t mr, const uint32_t* a, int64_t si, int64_t sk, const uint32_t* b, int64_t sb, int64_t K2,
                    float* C, int64_t ldc, int64_t nn, bool add) {
  switch (mr) {
    case 6: block<6>(a, si, sk, b, sb, K2, C, ldc, nn, add); break;
    case 5: block<5>(a, si, sk, b, sb, K2, C, ldc, nn, add); break;
    case 4: block<4>(a, si, sk, b, sb, K2, C, ldc, nn, add); break;
    case 3: block<3>(a, si, sk, b, sb, K2, C, ldc, nn, add); break;
    case 2: block<2>(a, si, sk, b, sb, K2, C, ldc, nn, add); break;
    default: block<1>(a, si, sk, b, sb, K2, C, ldc, nn, add); break;
  }
}

// One panel: `rows` (<= kPanel) rows of W into out ([K2][kPanel] words, rows past `rows` 0).  A whole panel moves
// 16 rows x 16 pairs at a time through transpose16; the rest word by word.
void pack_panel(const uint16_t* W, int64_t ldw, int64_t rows, int64_t K, uint32_t* o) {
  const int64_t K2 = pairs(K), even = K / 2;
  int64_t done = 0;  // pairs packed by the vector loop (all rows)
  if (rows == kPanel) {
    done = even / 16 * 16;
    for (int64_t g = 0; g < kPanel; g += 16)
      for (int64_t k0 = 0; k0 < done; k0 += 16) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(W + (g + i) * ldw + 2 * k0);
        simd512::transpose16(r);
        for (int j = 0; j < 16; ++j) _mm512_storeu_si512(o + (k0 + j) * kPanel + g, r[j]);
      }
  }
  for (int64_t j = 0; j < kPanel; ++j) {
    if (j >= rows) {
      for (int64_t k = done; k < K2; ++k) o[k * kPanel + j] = 0;
      continue;
    }
    const uint16_t* row = W + j * ldw;
    for (int64_t k = done; k < even; ++k) {
      uint32_t w;
      std::memcpy(&w, row + 2 * k, 4);  // little-endian: the even k in the low half, as VDPBF16PS pairs them
      o[k * kPanel + j] = w;
    }
    if (K2 > even) o[even * kPanel + j] = row[K - 1];
  }
}

}  // namespace

void pack_w(const uint16_t* W, int64_t ldw, int64_t n, int64_t K, int64_t p0, int64_t p1, uint32_t* out) {
  const int64_t K2 = pairs(K);
  for (int64_t p = p0; p < p1; ++p)
    pack_panel(W + p * kPanel * ldw, ldw, lesser(kPanel, n - p * kPanel), K, out + p * K2 * kPanel);
}

void pack_x(const float* x, int64_t ldx, int64_t m, int64_t K, uint32_t* out) {
  const int64_t K2 = pairs(K), P = (m + kRows - 1) / kRows;
  for (int64_t p = 0; p < P; ++p) {
    uint32_t* o = out + p * K2 * kRows;
    for (int64_t i = 0; i < kRows; ++i) {
      const int64_t r = p * kRows + i;
      if (r >= m) {
        for (int64_t k = 0; k < K2; ++k) o[k * kRows + i] = 0;
        continue;
      }
      const float* row = x + r * ldx;
      for (int64_t k = 0; k < K2; ++k) {
        const uint32_t lo = to_bf16(row[2 * k]);
        const uint32_t hi = 2 * k + 1 < K ? to_bf16(row[2 * k + 1]) : 0u;
        o[k * kRows + i] = lo | (hi << 16);
      }
    }
  }
}

namespace {

// 16 fp32 values rounded to bf16 (round to nearest even, like to_bf16), each in the low half of a 32-bit lane.
inline __m512i bf16_lanes(__m512 v) { return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)); }

}  // namespace

void pack_row_pairs(const float* src, int64_t ld, int64_t rows, int64_t cols, uint32_t* out, int64_t ldo) {
  const int64_t K2 = pairs(rows);
  for (int64_t k = 0; k < K2; ++k) {
    const float* lo = src + 2 * k * ld;
    const float* hi = 2 * k + 1 < rows ? lo + ld : nullptr;
    uint32_t* o = out + k * ldo;
    int64_t c = 0;
    for (; c < cols; c += 16) {
      const int64_t left = cols - c;
      const __mmask16 mask = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1u);
      const __m512i l = bf16_lanes(_mm512_maskz_loadu_ps(mask, lo + c));
      const __m512i h = hi ? bf16_lanes(_mm512_maskz_loadu_ps(mask, hi + c)) : _mm512_setzero_si512();
      _mm512_mask_storeu_epi32(o + c, mask, _mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
    }
    for (c = cols; c < ldo; ++c) o[c] = 0;
  }
}

void pack_row_pairs_bf16(const uint16_t* src, int64_t ld, int64_t rows, int64_t cols, uint32_t* out, int64_t ldo) {
  const int64_t K2 = pairs(rows);
  // Word j of the first (second) half: element j (16 + j) of the low row, then the same of the high row.
  alignas(64) int16_t lo_idx[32], hi_idx[32];
  for (int j = 0; j < 16; ++j) {
    lo_idx[2 * j] = static_cast<int16_t>(j);
    lo_idx[2 * j + 1] = static_cast<int16_t>(32 + j);
    hi_idx[2 * j] = static_cast<int16_t>(16 + j);
    hi_idx[2 * j + 1] = static_cast<int16_t>(48 + j);
  }
  const __m512i ilo = _mm512_load_si512(lo_idx), ihi = _mm512_load_si512(hi_idx);
  for (int64_t k = 0; k < K2; ++k) {
    const uint16_t* lo = src + 2 * k * ld;
    const uint16_t* hi = 2 * k + 1 < rows ? lo + ld : nullptr;
    uint32_t* o = out + k * ldo;
    int64_t c = 0;
    for (; c < cols; c += 32) {
      const int64_t left = cols - c;
      const __mmask32 mask = left >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << left) - 1u);
      const __m512i l = _mm512_maskz_loadu_epi16(mask, lo + c);
      const __m512i h = hi ? _mm512_maskz_loadu_epi16(mask, hi + c) : _mm512_setzero_si512();
      const __m512i w0 = _mm512_permutex2var_epi16(l, ilo, h), w1 = _mm512_permutex2var_epi16(l, ihi, h);
      if (left >= 32) {
        _mm512_storeu_si512(o + c, w0);
        _mm512_storeu_si512(o + c + 16, w1);
      } else {
        const __mmask16 m0 = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1u);
        const __mmask16 m1 = left > 16 ? __mmask16((1u << (left - 16)) - 1u) : __mmask16(0);
        _mm512_mask_storeu_epi32(o + c, m0, w0);
        _mm512_mask_storeu_epi32(o + c + 16, m1, w1);
      }
    }
    for (c = cols; c < ldo; ++c) o[c] = 0;
  }
}

void pack_grad(const float* src, int64_t ld, int64_t rows, int64_t cols, uint32_t* by_col, int64_t ldc,
               uint32_t* by_row, int64_t ldr) {
  const int64_t K2 = pairs(rows);
  for (int64_t k = 0; k < K2; ++k) {
    const float* lo = src + 2 * k * ld;
    const bool two = 2 * k + 1 < rows;
    const float* hi = lo + ld;
    uint32_t* c_lo = by_col + 2 * k * ldc;
    uint32_t* c_hi = c_lo + ldc;
    uint32_t* r = by_row + k * ldr;
    for (int64_t c = 0; c < cols; c += 32) {  // 32 entries of both rows: 32 words by row pairs, 16 per row by pairs
      const int64_t left = cols - c;
      const __mmask16 m0 = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1u);
      const __mmask16 m1 = left >= 32 ? __mmask16(0xffff) : left > 16 ? __mmask16((1u << (left - 16)) - 1u) : 0;
      const __m512 l0 = _mm512_maskz_loadu_ps(m0, lo + c), l1 = _mm512_maskz_loadu_ps(m1, lo + c + 16);
      const __m512 h0 = two ? _mm512_maskz_loadu_ps(m0, hi + c) : _mm512_setzero_ps();
      const __m512 h1 = two ? _mm512_maskz_loadu_ps(m1, hi + c + 16) : _mm512_setzero_ps();
      _mm512_mask_storeu_epi32(r + c, m0, _mm512_or_si512(bf16_lanes(l0), _mm512_slli_epi32(bf16_lanes(h0), 16)));
      _mm512_mask_storeu_epi32(r + c + 16, m1, _mm512_or_si512(bf16_lanes(l1), _mm512_slli_epi32(bf16_lanes(h1), 16)));
      const int64_t words = lesser(16, (left + 1) / 2);  // pairs of this step (an odd last entry paired with 0)
      const __mmask16 mw = words >= 16 ? __mmask16(0xffff) : __mmask16((1u << words) - 1u);
      _mm512_mask_storeu_epi32(c_lo + c / 2, mw, (__m512i)_mm512_cvtne2ps_pbh(l1, l0));
      if (two) _mm512_mask_storeu_epi32(c_hi + c / 2, mw, (__m512i)_mm512_cvtne2ps_pbh(h1, h0));
    }
    for (int64_t c = cols; c < ldr; ++c) r[c] = 0;
  }
}

void gemm_words(const uint32_t* a, int64_t si, int64_t sk, int64_t m, const uint32_t* b, int64_t sb, int64_t ncols,
                int64_t K2, float* C, int64_t ldc, bool add) {
  for (int64_t c0 = 0; c0 < ncols; c0 += kPanel) {
    const int64_t nn = lesser(kPanel, ncols - c0);
    for (int64_t r0 = 0; r0 < m; r0 += kRows)
      block_rows_any(lesser(kRows, m - r0), a + r0 * si, si, sk, b + c0, sb, K2, C + r0 * ldc + c0, ldc, nn, add);
  }
}

void gemm(const uint32_t* x, int64_t m, const uint32_t* w, int64_t n, int64_t K, int64_t p0, int64_t p1, float* C,
          int64_t ldc) {
  const int64_t K2 = pairs(K);
  for (int64_t p = p0; p < p1; ++p)
    rows_times_panel(x, m, w + p * K2 * kPanel, K2, C + p * kPanel, ldc, lesser(kPanel, n - p * kPanel));
}

void gemm_streamed(const uint32_t* x, int64_t m, const uint16_t* W, int64_t ldw, int64_t n, int64_t K, int64_t p0,
                   int64_t p1, float* C, int64_t ldc, uint32_t* panel) {
  const int64_t K2 = pairs(K);
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t nn = lesser(kPanel, n - p * kPanel);
    pack_panel(W + p * kPanel * ldw, ldw, nn, K, panel);
    rows_times_panel(x, m, panel, K2, C + p * kPanel, ldc, nn);
  }
}

}  // namespace bf16dot
}  // namespace copsd_cpu

#else  // not x86-64 GCC/Clang: never called (bf16_gemm_supported() is false)

namespace copsd_cpu {
namespace bf16dot {
void pack_w(const uint16_t*, int64_t, int64_t, int64_t, int64_t, int64_t, uint32_t*) {}
void pack_x(const float*, int64_t, int64_t, int64_t, uint32_t*) {}
void gemm(const uint32_t*, int64_t, const uint32_t*, int64_t, int64_t, int64_t, int64_t, float*, int64_t) {}
void gemm_streamed(const uint32_t*, int64_t, const uint16_t*, int64_t, int64_t, int64_t, int64_t, int64_t, float*,
                   int64_t, uint32_t*) {}
void pack_row_pairs(const float*, int64_t, int64_t, int64_t, uint32_t*, int64_t) {}
void pack_row_pairs_bf16(const uint16_t*, int64_t, int64_t, int64_t, uint32_t*, int64_t) {}
void pack_grad(const float*, int64_t, int64_t, int64_t, uint32_t*, int64_t, uint32_t*, int64_t) {}
void gemm_words(const uint32_t*, int64_t, int64_t, int64_t, const uint32_t*, int64_t, int64_t, int64_t, float*, int64_t,
                bool) {}
}  // namespace bf16dot
}  // namespace copsd_cpu

#endif
