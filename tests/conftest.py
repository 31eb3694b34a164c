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


# ----------------------------------------------------------------------------- backend fixtures of the op tests
# (applied with the marks tests/oplib.py defines: CPU, TRITON)


@pytest.fixture
def cpu_workspace(monkeypatch):
    """The C++ CPU backend with ~5 rows per chunk at the test vocabularies, so the row-chunk loop runs many
    times; skipped where the extension is not built."""
    from copsd.backends import cpu

    if not cpu.available():
        pytest.skip("copsd._C (C++ CPU extension) is not built")
    monkeypatch.setattr(cpu, "WORKSPACE_BYTES", 5 * 2 * 211 * 8)


@pytest.fixture(params=["fused", "chunked"])
def triton_path(request, monkeypatch):
    """Run a Triton test on both GPU paths of the backend (once for tests that do not use them)."""
    if getattr(request.function, "path_independent", False) and request.param == "fused":
        pytest.skip("does not depend on the path")
    monkeypatch.setenv("COPSD_TRITON_PATH", request.param)
    return request.param


@pytest.fixture
def triton_slices(monkeypatch):
    """Tiny gradient workspaces: several vocabulary slices per backward (exercises dX accumulation)
    on the fused path, one token per chunk on the chunked path (exercises the dW accumulation)."""
    from copsd.backends import _triton_common as tc

    monkeypatch.setattr(tc, "WORKSPACE_BYTES", 1)
    monkeypatch.setattr(tc, "GATHER_ELEMS", 64)
    monkeypatch.setattr(tc, "CHUNK_BYTES", 1)
