// AVX-512 helpers shared by the hand-written GEMM kernels (gemm_bf16.cpp, gemm_f32.cpp).  Include it only after the
// file's `#pragma GCC target(...)` with AVX-512F: the functions are static (one copy per file), so each file's copy
// is compiled for that file's target.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace copsd_cpu {
namespace simd512 {

// The 16 x 16 transpose of 32-bit words: r[i] (row i, words 0..15) becomes r[j] (word j of rows 0..15).
static inline void transpose16(__m512i (&r)[16]) {
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

// The first `n` (0..16) lanes.
static inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
}

// Stores an R x 16V block of fp32 sums acc (its first nn columns; nn <= 16V) at C (row stride ldc), or adds it to C
// (`add`).
template <int R, int V>
static inline __attribute__((always_inline)) void store_rows(__m512 (&acc)[R][V], float* C, int64_t ldc, int64_t nn,
                                                             bool add) {
  if (nn == 16 * V) {
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < V; ++j) {
        float* c = C + i * ldc + 16 * j;
        _mm512_storeu_ps(c, add ? _mm512_add_ps(_mm512_loadu_ps(c), acc[i][j]) : acc[i][j]);
      }
    return;
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < V; ++j) {
      const __mmask16 mask = lanes(nn - 16 * j);
      if (mask == 0) break;
      float* c = C + i * ldc + 16 * j;
      _mm512_mask_storeu_ps(c, mask, add ? _mm512_add_ps(_mm512_maskz_loadu_ps(mask, c), acc[i][j]) : acc[i][j]);
    }
}

}  // namespace simd512
}  // namespace copsd_cpu
