import os
import sys

import torch

# Triton's own @jit helpers are bound when triton.language is first imported, so the
# interpreter must be chosen before anything imports triton: on a machine without a GPU the
# Triton kernels run (slowly) on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture
def small_chunks(monkeypatch):
    """Make the reference backend chunk tiny tensors, so the tests exercise the chunk loops."""
    from copsd.backends import reference

    monkeypatch.setattr(reference, "CHUNK_TOKENS", 16)
    monkeypatch.setattr(reference, "CHUNK_VOCAB", 64)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
