"""``copsd info``: what a bug report needs (versions, OS, CPU ISA level, GPUs, built backends), like ``trl env``."""

NAME = "info"
HELP = "print copsd and library versions, OS, CPU ISA level, GPUs and the built backends (paste it into bug reports)"

PACKAGES = ("torch", "triton", "transformers", "accelerate", "peft", "datasets", "safetensors", "tokenizers",
            "tensorboard")


def add_arguments(parser):
    pass


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    """The report as an ordered dict of field -> text."""
    import platform

    import torch

    import copsd
    from copsd.ops import available_backends

    info = {"copsd version": copsd.__version__, "Platform": platform.platform(),
            "Python version": platform.python_version()}
    for name in PACKAGES:
        info[f"{name} version"] = _version(name)
    info["CUDA (torch build)"] = torch.version.cuda or "none"
    if torch.cuda.is_available():
        gpus = []
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            gpus.append(f"{i}: {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
        info["GPUs"] = ", ".join(gpus)
    else:
        info["GPUs"] = "none"
    try:
        from copsd.backends import cpu

        info["CPU ISA level (C++ backend)"] = cpu.isa() if cpu.available() else "C++ extension not built"
        if cpu.available():
            info["CPU bf16 logits kernel (AVX512-BF16)"] = "yes" if cpu.bf16_gemm_available() else "no"
            info["CPU fp32 GEMM kernel"] = cpu.f32_gemm_summary()
    except Exception as e:  # an unbuilt or broken extension must not hide the rest of the report
        info["CPU ISA level (C++ backend)"] = f"unavailable ({type(e).__name__})"
    info["CPU"] = platform.processor() or platform.machine()
    info["torch threads"] = str(torch.get_num_threads())
    info["available backends"] = ", ".join(available_backends())
    return info


def run(args):
    info = collect()
    print("\nCopy-paste the following information when reporting a copsd issue:\n")
    for k, v in info.items():
        print(f"- {k}: {v}")
    print()
    return 0
