"""``copsd info``: versions and the backends usable here."""

NAME = "info"
HELP = "print copsd, torch and triton versions and the available backends"


def add_arguments(parser):
    pass


def run(args):
    import platform

    import torch

    import copsd
    from copsd.ops import available_backends

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"copsd {copsd.__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}  triton {triton_version}")
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"cuda device: {cuda}")
    print(f"available_backends: {available_backends()}")
    return 0
