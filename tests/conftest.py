import os
import sys

import pytest
import torch

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
