"""The Triton backend as a whole: the GPU-path switch and the fp32-output cuBLAS GEMMs its chunked path relies
on.  The per-op tests of this backend (both GPU paths; the Triton interpreter on CPU tensors without a GPU) are
in ``test_linear_divergence.py``, ``test_linear_logprobs.py``, ``test_linear_topk.py``,
``test_logprobs_loss.py`` and ``test_attention.py``; the sm_90 compile check of every kernel is
``test_triton_sm90.py``.
"""

import pytest
import torch
from oplib import DEV, TRITON, path_independent, rand_lm

from copsd.backends import triton as tri
from copsd.ops._spec import LogitSpec


@TRITON
def test_path_env_is_checked(monkeypatch):
    monkeypatch.setenv("COPSD_TRITON_PATH", "fastest")
    x, w = rand_lm(2, 16, 5)
    with pytest.raises(ValueError, match="COPSD_TRITON_PATH"):
        tri.logprobs_forward(x, w, torch.zeros(2, dtype=torch.int64, device=DEV), LogitSpec())


@TRITON
@pytest.mark.gpu
@path_independent
def test_gpu_fp32_output_gemms():
    # The chunked path relies on cuBLAS bf16 GEMMs with fp32 output / in-place fp32 accumulation
    # (torch.mm/addmm out_dtype); a bf16-rounded fallback would lose ~3 digits: check it is active.
    from copsd.backends import _triton_common as tc

    g = torch.Generator(device=DEV).manual_seed(0)
    a = torch.randn(300, 1000, device=DEV, generator=g).bfloat16()
    b = torch.randn(1000, 500, device=DEV, generator=g).bfloat16()
    want = a.double() @ b.double()
    out = torch.empty(300, 500, device=DEV)
    tc.mm_f32(a, b, out)
    assert tc._OUT_DTYPE["ok"] is True
    assert (out.double() - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    acc = out.clone()
    tc.addmm_f32(acc, a, b)
    assert tc._ADDMM_OK.get((a.device, a.dtype)) is True
    assert (acc.double() - 2 * want).abs().max().item() <= 2e-4 * want.abs().max().item()
