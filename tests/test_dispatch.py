"""Dispatch (``copsd.backends``): why a backend is missing, loud failures, dtype fallbacks and the Triton path
chosen by argument (environment variable only as an override)."""

import warnings

import pytest
import torch

from copsd import backends
from copsd.backends import _cuda_topk, reference
from copsd.ops import available_backends, linear_logprobs
from copsd.ops._spec import LogitSpec

CPU = torch.device("cpu")


def test_available_backends_say_why_the_others_are_missing():
    got = available_backends()
    assert "reference" in got
    assert set(got) | set(got.missing) == {"reference", "cpu", "triton", "cuda"}
    assert not set(got) & set(got.missing)
    for name, reason in got.missing.items():
        assert isinstance(reason, str) and reason, name


def _break(monkeypatch, name):
    """Make backend ``name`` look built but broken (its check raises, as a failed extension import does)."""
    mod = backends._module(name)

    def missing():
        raise ImportError(f"{name}: undefined symbol _ZN3foo")

    monkeypatch.setattr(mod, "missing", missing)


def test_a_broken_backend_is_reported_never_skipped(monkeypatch):
    _break(monkeypatch, "cpu")
    got = available_backends()  # reporting never raises
    assert "cpu" not in got and "undefined symbol" in got.missing["cpu"]
    with pytest.raises(backends.BackendError, match="undefined symbol"):
        backends.get("divergence", CPU)  # auto on CPU would otherwise silently use the reference
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="undefined symbol"):
        linear_logprobs(x, w, torch.zeros(3, dtype=torch.long), backend="cpu")
    assert linear_logprobs(x, w, torch.zeros(3, dtype=torch.long), backend="reference")[0].shape == (3,)


def test_auto_on_a_gpu_warns_once_when_it_falls_back_to_the_reference(monkeypatch):
    if {"triton", "cuda"} & set(available_backends()) and torch.cuda.is_available():
        pytest.skip("a GPU backend is usable here")
    for name in ("triton", "cuda"):
        monkeypatch.setattr(backends._module(name), "missing", lambda name=name: f"{name} not installed (test)")
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match="reference backend.*triton not installed"):
        assert backends.get("topk", torch.device("cuda")) is reference
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.get("topk", torch.device("cuda")) is reference  # once


def test_explicit_unusable_backend_names_the_reason(monkeypatch):
    monkeypatch.setattr(backends._module("cuda"), "missing", lambda: "no CUDA device (test)")
    with pytest.raises(ValueError, match=r"no CUDA device \(test\).*available backends"):
        backends.get("topk", CPU, "cuda")


def test_paths_only_where_a_backend_has_them():
    with pytest.raises(ValueError, match="no paths"):
        backends.resolve("divergence", CPU, "reference:chunked")


@pytest.fixture
def triton_here():
    if "triton" not in available_backends():
        pytest.skip("triton backend not usable here (needs triton; TRITON_INTERPRET=1 on CPU)")


def test_triton_path_is_an_argument_and_the_env_only_overrides_the_default(triton_here, monkeypatch):
    monkeypatch.delenv("COPSD_TRITON_PATH", raising=False)
    monkeypatch.delenv("COPSD_BACKEND", raising=False)
    assert backends.resolve("divergence", CPU, "triton", (torch.float32,)).path == "chunked"
    assert backends.resolve("divergence", CPU, "triton:fused", (torch.float32,)).path == "fused"
    monkeypatch.setenv("COPSD_TRITON_PATH", "fused")
    assert backends.resolve("divergence", CPU, "triton", (torch.float32,)).path == "fused"
    assert backends.resolve("divergence", CPU, "triton:chunked", (torch.float32,)).path == "chunked"
    monkeypatch.setenv("COPSD_TRITON_PATH", "auto")
    assert backends.resolve("divergence", CPU, "triton", (torch.float32,)).path == "chunked"
    monkeypatch.setenv("COPSD_BACKEND", "triton:chunked")
    assert backends.resolve("divergence", CPU, "auto", (torch.float32,)).path == "chunked"
    with pytest.raises(ValueError, match="path must be one of"):
        backends.resolve("divergence", CPU, "triton:fastest", (torch.float32,))
    # the attention ops have one path: none is bound
    assert backends.resolve("merge_attention_states", CPU, "triton:chunked", (torch.float32,)).path is None


def test_float64_goes_to_the_reference_in_dispatch(triton_here):
    assert backends.resolve("topk", CPU, "triton", (torch.float32,)).NAME == "triton"
    k64 = backends.resolve("topk", CPU, "triton", (torch.float64,))
    assert k64.NAME == "reference" and k64.path is None
    assert backends.resolve("merge_attention_states", CPU, "triton", (torch.float32, torch.float64)).NAME == \
        "reference"


@pytest.mark.parametrize("k", [1, 3, 9])
def test_cuda_backend_topk_host_logic(k, monkeypatch):
    """The cuda backend's linear_topk (per-split torch.topk, merged by topk_merge on a GPU) against the reference;
    on CPU tensors the merge is torch.topk, so this checks the chunking, splits and LSE."""
    monkeypatch.setattr(_cuda_topk, "CHUNK_BYTES", 8 * 50 * 4)  # 4 tokens per chunk
    g = torch.Generator().manual_seed(0)
    x = torch.randn(11, 8, generator=g, dtype=torch.float64).float()
    w = torch.randn(50, 8, generator=g, dtype=torch.float64).float()
    logit = LogitSpec(temperature=0.8, logit_scale=1.5, softcap=4.0)
    ids, lp, lse = _cuda_topk.topk(x, w, k, logit)
    rid, rlp, rlse = reference.topk(x, w, k, logit)
    torch.testing.assert_close(lse, rlse, rtol=0, atol=2e-6)
    torch.testing.assert_close(lp, rlp, rtol=0, atol=2e-6)
    assert torch.equal(ids, rid)
