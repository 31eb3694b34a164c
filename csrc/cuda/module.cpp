// Python module for the CUDA extension.  Ops register themselves with
// TORCH_LIBRARY_FRAGMENT(copsd_cuda, m) in their own *_binding.cpp files and are called as
// torch.ops.copsd_cuda.<name>; the .cu files hold framework-free kernels and launchers.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "copsd CUDA kernels (ops are registered under torch.ops.copsd_cuda)";
}
