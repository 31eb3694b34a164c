// Python module of the C++ CPU extension (copsd._C).  Each op family registers its
// functions from its own file.
#include <torch/extension.h>

namespace copsd_cpu {
void register_loss(pybind11::module& m);
void register_gemm(pybind11::module& m);
void register_buffers(pybind11::module& m);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "copsd C++ CPU kernels (OpenMP + ATen GEMM per chunk, fused epilogues)";
  copsd_cpu::register_loss(m);
  copsd_cpu::register_gemm(m);
  copsd_cpu::register_buffers(m);
}
