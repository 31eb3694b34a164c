"""Build the native extensions.

* ``copsd._C``    -- C++ CPU kernels from ``csrc/cpu`` (OpenMP), always built unless
  ``COPSD_SKIP_NATIVE=1`` (no extension at all) or ``COPSD_SKIP_CPU=1`` (the CUDA one only: a GPU machine
  whose tensors never live on the CPU, or a quick GPU build).
* ``copsd._cuda`` -- CUDA kernels from ``csrc/cuda``, built only where torch has CUDA and a
  CUDA toolkit is found (``COPSD_SKIP_CUDA=1`` skips it).

Without any extension every op still works through the reference backend.  The Triton
package is ``copsd_kernels/``.  It must not be named ``kernels``: that is Hugging Face's hub-kernels
package, which transformers (5.25 on) installs and imports, and a ``kernels/`` directory in the
checkout would shadow it wherever Python runs from here (``python -m pytest`` puts the cwd first).
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("COPSD_SKIP_NATIVE"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("copsd: torch is not installed; skipping native extensions "
              "(install torch first, then pip install --no-build-isolation)", file=sys.stderr)
        return [], {}

    exts = []
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if cpu_sources and not _flag("COPSD_SKIP_CPU"):
        cxx = ["-O3", "-std=c++17", "-fopenmp"]
        if _flag("COPSD_NATIVE_ARCH"):
            cxx.append("-march=native")
        elif _is_x86():
            cxx.append("-march=x86-64-v2")
        exts.append(cpp_extension.CppExtension(
            "copsd._C", cpu_sources,
            extra_compile_args={"cxx": cxx},
            # -ldl: dlopen/dlsym find torch's MKL packed-GEMM symbols at run time (csrc/cpu/gemm.cpp).
            extra_link_args=["-fopenmp"] + (["-ldl"] if sys.platform.startswith("linux") else []),
        ))

    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))
                          + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    want_cuda = (not _flag("COPSD_SKIP_CUDA") and cuda_sources and torch.version.cuda is not None
                 and cpp_extension.CUDA_HOME is not None)
    if want_cuda:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not arch:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        exts.append(cpp_extension.CUDAExtension(
            "copsd._cuda", cuda_sources,
            extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                                "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
        ))
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


def _is_x86():
    import platform
    return platform.machine().lower() in ("x86_64", "amd64")


ext_modules, cmdclass = _extensions()

HAS_KERNELS = os.path.exists(os.path.join(ROOT, "copsd_kernels", "__init__.py"))

setup(
    packages=find_packages(include=["copsd", "copsd.*"]) + (["copsd_kernels"] if HAS_KERNELS else []),
    package_data={"copsd": ["data/*", "data/**/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
