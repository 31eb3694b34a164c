// torch.ops.copsd_cuda.topk_merge(values[N, M] float32, ids[N, M] int64, k) -> (values[N, k], ids[N, k])
// The k best (value descending, smaller id first on ties) of each row's candidates.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <tuple>

namespace copsd {
cudaError_t topk_merge_launch(const float* values, const int64_t* ids, int64_t rows, int M, int k,
                              float* out_values, int64_t* out_ids, cudaStream_t stream);
}

namespace {

std::tuple<at::Tensor, at::Tensor> topk_merge(const at::Tensor& values, const at::Tensor& ids, int64_t k) {
  TORCH_CHECK_VALUE(values.is_cuda() && ids.is_cuda(), "topk_merge: values and ids must be CUDA tensors");
  TORCH_CHECK_VALUE(values.dim() == 2, "topk_merge: values must be 2-D [rows, candidates], got ",
                    values.dim(), "-D");
  TORCH_CHECK_VALUE(ids.sizes() == values.sizes(), "topk_merge: ids must have the shape of values ",
                    values.sizes(), ", got ", ids.sizes());
  TORCH_CHECK_VALUE(values.scalar_type() == at::kFloat, "topk_merge: values must be float32, got ",
                    values.scalar_type());
  TORCH_CHECK_VALUE(ids.scalar_type() == at::kLong, "topk_merge: ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.device() == values.device(), "topk_merge: ids and values must share a device");
  const int64_t rows = values.size(0), M = values.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= M, "topk_merge: k must be in [1, ", M, "], got ", k);
  TORCH_CHECK_VALUE(M <= 16384, "topk_merge: at most 16384 candidates per row, got ", M);
  const c10::cuda::CUDAGuard guard(values.device());
  auto v = values.contiguous();
  auto i = ids.contiguous();
  auto out_v = at::empty({rows, k}, v.options());
  auto out_i = at::empty({rows, k}, i.options());
  if (rows == 0) return {out_v, out_i};
  const cudaError_t err = copsd::topk_merge_launch(
      v.data_ptr<float>(), i.data_ptr<int64_t>(), rows, static_cast<int>(M), static_cast<int>(k),
      out_v.data_ptr<float>(), out_i.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "topk_merge: CUDA launch failed: ", cudaGetErrorString(err));
  return {out_v, out_i};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(copsd_cuda, m) {
  m.def("topk_merge(Tensor values, Tensor ids, int k) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(copsd_cuda, CUDA, m) { m.impl("topk_merge", &topk_merge); }
