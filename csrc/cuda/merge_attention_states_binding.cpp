// torch.ops.copsd_cuda.merge_attention_states: PyTorch binding of the framework-free merge kernel in
// merge_attention_states.cu.  Validation of shapes/dtypes for users lives in copsd.ops (Python); the
// checks here only guard the raw-pointer contract.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>
#include <torch/types.h>

#include <tuple>

namespace copsd {
cudaError_t merge_attention_states_launch(const void* o_a, const float* lse_a, const void* o_b,
                                          const float* lse_b, void* o, float* lse, int64_t B, int64_t S,
                                          int64_t H, int64_t D, int dtype_code, cudaStream_t stream);
}  // namespace copsd

namespace {

std::tuple<at::Tensor, at::Tensor> merge_attention_states_cuda(const at::Tensor& o_a, const at::Tensor& lse_a,
                                                                const at::Tensor& o_b, const at::Tensor& lse_b) {
  TORCH_CHECK(o_a.dim() == 4, "o_a must be [B, S, H, D]");
  TORCH_CHECK(o_b.sizes() == o_a.sizes() && o_b.scalar_type() == o_a.scalar_type(),
              "o_b must match o_a in shape and dtype");
  const int64_t B = o_a.size(0), S = o_a.size(1), H = o_a.size(2), D = o_a.size(3);
  TORCH_CHECK(lse_a.dim() == 3 && lse_a.size(0) == B && lse_a.size(1) == H && lse_a.size(2) == S,
              "lse_a must be [B, H, S]");
  TORCH_CHECK(lse_b.sizes() == lse_a.sizes(), "lse_b must match lse_a");
  int code;
  switch (o_a.scalar_type()) {
    case at::kFloat: code = 0; break;
    case at::kHalf: code = 1; break;
    case at::kBFloat16: code = 2; break;
    default: TORCH_CHECK(false, "o_a must be float32, float16 or bfloat16");
  }
  const c10::cuda::CUDAGuard guard(o_a.device());
  const at::Tensor oa = o_a.contiguous(), ob = o_b.contiguous();
  const at::Tensor la = lse_a.to(at::kFloat).contiguous(), lb = lse_b.to(at::kFloat).contiguous();
  at::Tensor o = at::empty_like(oa);
  at::Tensor lse = at::empty({B, H, S}, oa.options().dtype(at::kFloat));
  const cudaError_t err = copsd::merge_attention_states_launch(
      oa.data_ptr(), la.data_ptr<float>(), ob.data_ptr(), lb.data_ptr<float>(), o.data_ptr(), lse.data_ptr<float>(),
      B, S, H, D, code, c10::cuda::getCurrentCUDAStream(oa.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "merge_attention_states kernel launch failed: ", cudaGetErrorString(err));
  return {o, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(copsd_cuda, m) {
  m.def("merge_attention_states(Tensor o_a, Tensor lse_a, Tensor o_b, Tensor lse_b) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(copsd_cuda, CUDA, m) { m.impl("merge_attention_states", &merge_attention_states_cuda); }
