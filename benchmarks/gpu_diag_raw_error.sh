#!/usr/bin/env bash
# Diagnosis for a GPU session: the raw op torch.ops.copsd_cuda.topk_merge, called with k larger than its candidates,
# killed its process with SIGSEGV on an H200 (2026-11-27 and 2026-12-04) instead of raising the ValueError its
# TORCH_CHECK_VALUE throws.  This prints what decides whether a C++ exception can cross from the extension into
# torch: the compiler the extension was built with, torch's C++ ABI, the C++ runtime both load; then the crash
# itself (Python's faulthandler), a control (an error thrown by torch's own dispatcher for the same op), and a
# cuda-gdb backtrace of the crash; last, two control extensions built inline (about a minute).  Run from the
# repository root after the CUDA extension is built:
#   GPU_DIAG_CMD="bash benchmarks/gpu_diag_raw_error.sh" GPU_DIAG_CAP_S=150 bash benchmarks/gpu_check.sh
set -x
PY=${PYTHON:-python3}
$PY -c "import sys; sys.path.insert(0, 'tests'); import test_linear_topk as t; open('/tmp/raw.py', 'w').write(t.RAW_ERROR_SCRIPT)"
g++ --version | head -1; command -v c++ g++ gcc; echo "CXX=${CXX:-} CC=${CC:-}"
$PY -c "import torch; print('torch cxx11 abi', torch._C._GLIBCXX_USE_CXX11_ABI); print(torch.__config__.show())" | head -12
so=$(ls copsd/_cuda*.so) && ldd "$so" | grep -E "stdc|gcc_s|c10|torch"
$PY -X faulthandler /tmp/raw.py; echo "raw op error path: rc=$?"
cat > /tmp/dispatch_raise.py <<'PY'
import torch, copsd._cuda  # noqa: F401
try:
    torch.ops.copsd_cuda.topk_merge(torch.randn(3, 5), torch.arange(15).view(3, 5), 2)  # CPU: no kernel
except Exception as e:
    print("RAISED by the dispatcher:", type(e).__name__, str(e).splitlines()[0])
PY
$PY /tmp/dispatch_raise.py; echo "dispatcher error path: rc=$?"
TORCH_SHOW_CPP_STACKTRACES=1 $PY -X faulthandler /tmp/raw.py >/tmp/raw_stack.log 2>&1
echo "raw op with C++ stack traces: rc=$?"; tail -n 25 /tmp/raw_stack.log
timeout 50 cuda-gdb -q -batch -ex "set pagination off" -ex run -ex bt --args "$PY" /tmp/raw.py 2>&1 \
  | grep -v "^\[New Thread\|^\[Thread" | tail -45
# Is it any extension built here, or this one?  A CPU op that throws the same way, built with torch's own flags
# (its default -std) and then with this project's -std=c++17 (setup.py), each called with a bad argument.
cat > /tmp/inline_raise.py <<'PY'
import sys, torch
from torch.utils.cpp_extension import load_inline
src = """
#include <torch/library.h>
at::Tensor must_be_positive(const at::Tensor& x, int64_t k) {
  TORCH_CHECK_VALUE(k > 0, "k must be positive, got ", k);
  return x;
}
TORCH_LIBRARY(diag_raise_NAME, m) { m.def("f(Tensor x, int k) -> Tensor"); }
TORCH_LIBRARY_IMPL(diag_raise_NAME, CPU, m) { m.impl("f", &must_be_positive); }
"""
for name, flags in (("default", []), ("cxx17", ["-O3", "-std=c++17"])):
    load_inline(f"diag_raise_{name}", cpp_sources=src.replace("NAME", name), extra_cflags=flags, is_python_module=False)
    try:
        getattr(torch.ops, f"diag_raise_{name}").f(torch.ones(1), 0)
    except Exception as e:
        print(f"{name}: RAISED", type(e).__name__, str(e).splitlines()[0], flush=True)
PY
timeout 120 $PY -X faulthandler /tmp/inline_raise.py; echo "inline CPU extension error path: rc=$?"
