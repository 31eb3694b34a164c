// Attention-state merge (cascade attention), framework-free: raw pointers in, raw pointers out.
//
// o [B, S, H, D] (float / half / bfloat16), lse [B, H, S] float32, natural log with the softmax scale
// folded in (flash-attn's convention; FlashInfer's base-2 LSE must be converted before calling).
//   o   = (e^{lse_a} o_a + e^{lse_b} o_b) / (e^{lse_a} + e^{lse_b})
//   lse = logaddexp(lse_a, lse_b)
// A row empty on both sides (lse_a = lse_b = -inf) becomes o = 0, lse = -inf, never NaN.
// The two weights are computed once per row; the D-loop is vectorised over threads of a warp-sized
// group so every row is read and written with coalesced accesses.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace copsd {
namespace {

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// One group of kGroup threads per (b, s, h) row; a block holds kRowsPerBlock rows.
constexpr int kGroup = 32;
constexpr int kRowsPerBlock = 8;

template <typename T>
__global__ void merge_attention_states_kernel(const T* __restrict__ o_a, const float* __restrict__ lse_a,
                                              const T* __restrict__ o_b, const float* __restrict__ lse_b,
                                              T* __restrict__ o, float* __restrict__ lse, int64_t n_rows,
                                              int64_t S, int64_t H, int64_t D) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;  // (b*S + s)*H + h
  if (row >= n_rows) return;
  const int64_t h = row % H;
  const int64_t bs = row / H;
  const int64_t s = bs % S;
  const int64_t b = bs / S;
  const int64_t lse_idx = (b * H + h) * S + s;

  const float la = lse_a[lse_idx];
  const float lb = lse_b[lse_idx];
  const float m = fmaxf(la, lb);
  const float m_safe = (m == -INFINITY) ? 0.0f : m;
  const float wa = expf(la - m_safe);  // exp(-inf) = 0
  const float wb = expf(lb - m_safe);
  const float tot = wa + wb;
  const bool nonempty = tot > 0.0f;
  const float inv = nonempty ? 1.0f / tot : 0.0f;
  const float ca = wa * inv;
  const float cb = wb * inv;

  const int64_t base = row * D;
  for (int64_t d = threadIdx.x; d < D; d += kGroup) {
    const float v = ca * to_float<T>(o_a[base + d]) + cb * to_float<T>(o_b[base + d]);
    o[base + d] = from_float<T>(v);
  }
  if (threadIdx.x == 0) lse[lse_idx] = nonempty ? m_safe + logf(tot) : -INFINITY;
}

template <typename T>
cudaError_t launch(const void* o_a, const float* lse_a, const void* o_b, const float* lse_b, void* o,
                   float* lse, int64_t B, int64_t S, int64_t H, int64_t D, cudaStream_t stream) {
  const int64_t n_rows = B * S * H;
  if (n_rows == 0) return cudaSuccess;
  const dim3 block(kGroup, kRowsPerBlock);
  const int64_t blocks = (n_rows + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > 2147483647LL) return cudaErrorInvalidValue;
  merge_attention_states_kernel<T><<<static_cast<unsigned int>(blocks), block, 0, stream>>>(
      static_cast<const T*>(o_a), lse_a, static_cast<const T*>(o_b), lse_b, static_cast<T*>(o), lse, n_rows, S,
      H, D);
  return cudaGetLastError();
}

}  // namespace

// dtype_code: 0 = float32, 1 = float16, 2 = bfloat16.  All pointers device memory, contiguous.
// Returns cudaSuccess, or cudaErrorInvalidValue for an unknown dtype_code / oversized grid.
cudaError_t merge_attention_states_launch(const void* o_a, const float* lse_a, const void* o_b,
                                          const float* lse_b, void* o, float* lse, int64_t B, int64_t S,
                                          int64_t H, int64_t D, int dtype_code, cudaStream_t stream) {
  switch (dtype_code) {
    case 0: return launch<float>(o_a, lse_a, o_b, lse_b, o, lse, B, S, H, D, stream);
    case 1: return launch<__half>(o_a, lse_a, o_b, lse_b, o, lse, B, S, H, D, stream);
    case 2: return launch<__nv_bfloat16>(o_a, lse_a, o_b, lse_b, o, lse, B, S, H, D, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace copsd
