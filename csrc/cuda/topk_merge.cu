// Top-k merge of per-split candidates: for each row, the k largest of M (value, id) candidates,
// descending by value, ties broken by the smaller id.  Framework-free (raw pointers + a CUDA
// stream); the PyTorch binding lives in topk_merge_binding.cpp.
//
// One thread block per row: the M candidates are staged in shared memory padded to a power of
// two P with (-inf, INT64_MAX) and bitonic-sorted; the first k are written out.  The fused top-k
// kernel produces at most a few thousand candidates per row (splits x k), so one block per row
// with P <= 16384 covers every launch; larger M returns cudaErrorInvalidValue and the caller
// falls back to torch.topk.
#include <cuda_runtime.h>
#include <stdint.h>

namespace copsd {
namespace {

__device__ __forceinline__ bool comes_first(float va, int64_t ia, float vb, int64_t ib) {
  return va > vb || (va == vb && ia < ib);
}

__global__ void topk_merge_kernel(const float* __restrict__ values, const int64_t* __restrict__ ids,
                                  int M, int P, int k, float* __restrict__ out_values,
                                  int64_t* __restrict__ out_ids) {
  extern __shared__ unsigned char smem_raw[];
  int64_t* s_id = reinterpret_cast<int64_t*>(smem_raw);  // 8-byte aligned first
  float* s_val = reinterpret_cast<float*>(s_id + P);
  const int64_t row = blockIdx.x;
  const float* v_row = values + row * static_cast<int64_t>(M);
  const int64_t* i_row = ids + row * static_cast<int64_t>(M);
  for (int t = threadIdx.x; t < P; t += blockDim.x) {
    if (t < M) {
      s_val[t] = v_row[t];
      s_id[t] = i_row[t];
    } else {
      s_val[t] = -__int_as_float(0x7f800000);  // -inf
      s_id[t] = INT64_MAX;
    }
  }
  __syncthreads();
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < (P >> 1); t += blockDim.x) {
        const int lo = 2 * t - (t & (stride - 1));
        const int hi = lo + stride;
        const bool descending = (lo & size) == 0;
        const float vl = s_val[lo], vh = s_val[hi];
        const int64_t il = s_id[lo], ih = s_id[hi];
        const bool swap = descending ? comes_first(vh, ih, vl, il) : comes_first(vl, il, vh, ih);
        if (swap) {
          s_val[lo] = vh;
          s_val[hi] = vl;
          s_id[lo] = ih;
          s_id[hi] = il;
        }
      }
      __syncthreads();
    }
  }
  for (int t = threadIdx.x; t < k; t += blockDim.x) {
    out_values[row * k + t] = s_val[t];
    out_ids[row * k + t] = s_id[t];
  }
}

}  // namespace

// values/ids: [rows, M] row-major; out_values/out_ids: [rows, k].  Requires 1 <= k <= M.
cudaError_t topk_merge_launch(const float* values, const int64_t* ids, int64_t rows, int M, int k,
                              float* out_values, int64_t* out_ids, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (M < 1 || k < 1 || k > M || rows > 0x7fffffffLL) return cudaErrorInvalidValue;
  int P = 1;
  while (P < M) P <<= 1;
  if (P < 2) P = 2;
  if (P > 16384) return cudaErrorInvalidValue;
  const size_t smem = static_cast<size_t>(P) * (sizeof(float) + sizeof(int64_t));
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(topk_merge_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  int threads = P / 2;
  if (threads > 1024) threads = 1024;
  if (threads < 32) threads = 32;
  topk_merge_kernel<<<static_cast<unsigned>(rows), threads, smem, stream>>>(values, ids, M, P, k, out_values,
                                                                           out_ids);
  return cudaGetLastError();
}

}  // namespace copsd
