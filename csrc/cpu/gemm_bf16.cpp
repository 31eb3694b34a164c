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

// Stores the R x kPanel block acc (columns < nn of it) at C.
template <int R>
inline void store(const __m512 (&acc)[R][kVecs], float* C, int64_t ldc, int64_t nn) {
  if (nn == kPanel) {
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < kVecs; ++j) _mm512_storeu_ps(C + i * ldc + 16 * j, acc[i][j]);
    return;
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < kVecs; ++j) {
      const int64_t left = nn - 16 * j;
      if (left <= 0) break;
      const __mmask16 mask = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1u);
      _mm512_mask_storeu_ps(C + i * ldc + 16 * j, mask, acc[i][j]);
    }
}

// One R x kPanel block (R <= kRows): C[0..R, 0..nn) = the first R rows of the packed x panel times the packed W
// panel over K2 pairs.
template <int R>
inline void block(const uint32_t* a, const uint32_t* b, int64_t K2, float* C, int64_t ldc, int64_t nn) {
  __m512 acc[R][kVecs];
  alignas(64) float total[R][kPanel];  // in memory: 24 more accumulators would not fit the 32 registers
  for (int64_t k0 = 0; k0 < K2; k0 += kInner) {
    const int64_t k1 = lesser(K2, k0 + kInner);
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < kVecs; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = k0; k < k1; ++k) {
      __m512bh bv[kVecs];
      for (int j = 0; j < kVecs; ++j) bv[j] = (__m512bh)_mm512_loadu_si512(b + k * kPanel + 16 * j);
      for (int i = 0; i < R; ++i) {
        const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[k * kRows + i]));
        for (int j = 0; j < kVecs; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[j]);
      }
    }
    if (k1 == K2 && k0 == 0) {
      store<R>(acc, C, ldc, nn);
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
  store<R>(acc, C, ldc, nn);
}

void block_rows(int64_t mr, const uint32_t* a, const uint32_t* b, int64_t K2, float* C, int64_t ldc, int64_t nn) {
  static_assert(kRows == 6, "one case per row count below");
  switch (mr) {
    case 6: block<6>(a, b, K2, C, ldc, nn); break;
    case 5: block<5>(a, b, K2, C, ldc, nn); break;
    case 4: block<4>(a, b, K2, C, ldc, nn); break;
    case 3: block<3>(a, b, K2, C, ldc, nn); break;
    case 2: block<2>(a, b, K2, C, ldc, nn); break;
    default: block<1>(a, b, K2, C, ldc, nn); break;
  }
}

// C[0..m, 0..nn) = every row panel of the packed x times one packed W panel b.
void rows_times_panel(const uint32_t* x, int64_t m, const uint32_t* b, int64_t K2, float* C, int64_t ldc, int64_t nn) {
  for (int64_t r0 = 0; r0 < m; r0 += kRows)
    block_rows(lesser(kRows, m - r0), x + r0 * K2, b, K2, C + r0 * ldc, ldc, nn);
}

// The 16 x 16 transpose of 32-bit words: r[i] (row i, words 0..15) becomes r[j] (word j of rows 0..15).
inline void transpose16(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: words 4L.. of rows 2i and 2i + 1 interleaved
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // r[4g + c], lane L: word 4L + c of rows 4g .. 4g + 3
    r[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    r[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    r[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    r[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // the 4 x 4 transpose of 128-bit lanes of r[c], r[4 + c], r[8 + c], r[12 + c]
    const __m512i b0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), b1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xee);
    const __m512i b2 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44);
    const __m512i b3 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xee);
    t[c] = _mm512_shuffle_i32x4(b0, b2, 0x88);       // word c
    t[4 + c] = _mm512_shuffle_i32x4(b0, b2, 0xdd);   // word 4 + c
    t[8 + c] = _mm512_shuffle_i32x4(b1, b3, 0x88);   // word 8 + c
    t[12 + c] = _mm512_shuffle_i32x4(b1, b3, 0xdd);  // word 12 + c
  }
  for (int j = 0; j < 16; ++j) r[j] = t[j];
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
        transpose16(r);
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
}  // namespace bf16dot
}  // namespace copsd_cpu

#endif
