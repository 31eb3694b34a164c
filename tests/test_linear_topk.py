"""``linear_topk``: the k most likely ids per token, their log-probs and the LSE, on every backend.

Top-k answers are checked as sets with tie tolerance (``oplib.check_topk``) against the dense float64 logits of
``copsd.reference``.  Sections: the public op on the CPU backends, the C++ backend (``isa``-marked tests rerun
per dispatch level), the Triton backend (both GPU paths; interpreter without a GPU) and the CUDA
``topk_merge`` op that merges the Triton kernels' per-split candidates.
"""

import subprocess
import sys

import pytest
import torch
from oplib import (
    CPU,
    CPU_BACKENDS,
    DEV,
    F64,
    LOGITS,
    SPECS,
    TRITON,
    check_close,
    check_topk,
    cpu_inputs,
    dense,
    exact_order,
    path_independent,
    rand_lm,
    z64_of,
)

from copsd.backends import _cuda_topk, cpu
from copsd.backends import triton as tri
from copsd.ops import linear_topk
from copsd.ops._spec import LogitSpec

# ----------------------------------------------------------------------------- public op (reference, C++)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k", [1, 5, 64, 150])
def test_topk(backend, k, small_chunks):
    N, H, V = 23, 9, 150
    x, w = torch.randn(N, H, dtype=F64), torch.randn(V, H, dtype=F64)
    ids, lp, lse = linear_topk(x, w, k, temperature=0.9, softcap=4.0, backend=backend)
    ls = dense.logits(x, w, 0.9, 1.0, 4.0).log_softmax(-1)
    want_lp, _ = ls.topk(k, dim=1)
    assert ids.shape == (N, k) and ids.dtype == torch.int64
    check_close(lp, want_lp)                              # values and order
    check_close(ls.gather(1, ids), lp)                    # ids point at those values (ties may permute ids)
    assert (lp[:, 1:] <= lp[:, :-1]).all()
    check_close(lse, dense.logits(x, w, 0.9, 1.0, 4.0).logsumexp(-1))


def test_topk_ties_are_accepted_as_sets():
    x = torch.ones(3, 1, dtype=F64)
    w = torch.ones(10, 1, dtype=F64)  # every logit equal
    ids, lp, _ = linear_topk(x, w, 4)
    assert all(len(set(r.tolist())) == 4 for r in ids)
    check_close(lp, torch.full((3, 4), -torch.log(torch.tensor(10.0, dtype=F64)).item(), dtype=F64))


# ----------------------------------------------------------------------------- C++ CPU backend


@CPU
@pytest.mark.isa
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 7, 64, 211])
@pytest.mark.parametrize("logit_name", ["plain", "temp_scale_softcap"])
def test_cpu_topk_matches_dense(k, dtype, logit_name):
    N, H, V = 21, 10, 211
    logit = LOGITS[logit_name]
    x, w, _, _ = cpu_inputs(N, H, V, dtype)
    ids, lp, lse = cpu.topk(x, w, k, logit)
    z = dense.logits(x.double(), w.double(), logit.temperature, logit.logit_scale, logit.softcap)
    z_plain = None if dtype == torch.float64 else dense.logits(x, w, logit.temperature, logit.logit_scale,
                                                               logit.softcap)
    check_topk(ids, lp, lse, z, k, z_plain)


@CPU
@pytest.mark.isa
def test_cpu_topk_ties():
    """Duplicated lm_head rows give exactly tied logits; any tie-consistent answer is valid."""
    x, w, _, _ = cpu_inputs(9, 8, 211, torch.float32)
    w[100:140] = w[3]
    ids, lp, lse = cpu.topk(x, w, 50, LogitSpec())
    check_topk(ids, lp, lse, x.double() @ w.double().T, 50, x @ w.T)
    ids1, _, _ = cpu.topk(x, w, 1, LogitSpec())
    assert ids1.shape == (9, 1)


@pytest.fixture(params=[None, "5", "100"], ids=["tile=auto", "tile=5", "tile=100"])
def topk_tile(request, monkeypatch):
    """The C++ top-k's vocabulary tile (``COPSD_CPU_TOPK_TILE``): the default (one tile at these sizes) and
    tiles that split rows into many pieces, not multiples of the vector width or of the scan block, so a row's
    state (threshold, candidates, ties, LSE, non-finite logits) must carry across pieces."""
    if request.param is None:
        monkeypatch.delenv("COPSD_CPU_TOPK_TILE", raising=False)
    else:
        monkeypatch.setenv("COPSD_CPU_TOPK_TILE", request.param)
    return request.param


def _rows_as_gemm(Z):
    """Inputs whose lm_head GEMM gives exactly the finite logits ``Z [N, V]``: identity hidden states (each logit is
    one product by 1 plus zeros, exact in any BLAS)."""
    N = Z.shape[0]
    return torch.eye(N, dtype=Z.dtype), Z.T.contiguous()


def _adversarial_rows(V, dtype):
    """Rows that stress a threshold top-k: all equal, ascending (every logit beats the running k-th best),
    descending, few distinct values (ties everywhere), an ascending sawtooth of ties, a maximum at the very end,
    a random row, and one whose maximum jumps by far more than 60 twice (midway and at the end: the scan's sum
    relative to the running maximum must be redone relative to the block's)."""
    j = torch.arange(V, dtype=torch.float64)
    rows = [torch.full((V,), 1.5, dtype=torch.float64), j / 8, -j / 8, torch.randint(-3, 3, (V,)).double(),
            (j % 7) + j // 500, torch.randn(V, dtype=torch.float64), torch.randn(V, dtype=torch.float64)]
    rows[6][-1] = 40.0
    jump = torch.randn(V, dtype=torch.float64)
    jump[V // 2], jump[-1] = 90.0, 200.0
    rows.append(jump)
    return torch.stack(rows).to(dtype)


@CPU
@pytest.mark.isa
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("V", [1, 7, 16, 17, 1031, 4099])
def test_cpu_topk_adversarial_rows_exact_order(V, dtype, topk_tile):
    """Adversarial rows on every dispatch level: exactly the documented order (value descending, ties by
    ascending id), the exact values minus the LSE, for k from 1 to V; temperature 0.5 (an exact scale) takes
    the fused-scale path with the same order."""
    Z = _adversarial_rows(V, dtype)
    x, w = _rows_as_gemm(Z)
    z64 = Z.double()
    lse64 = z64.logsumexp(-1)
    for k in sorted(k for k in {1, 2, 16, 63, 257, V - 1, V} if 1 <= k <= V):
        for temp in (1.0, 0.5):
            ids, lp, lse = cpu.topk(x, w, k, LogitSpec(temperature=temp))
            zt = z64 / temp
            want_ids = torch.tensor([exact_order(r.tolist())[:k] for r in zt])
            assert torch.equal(ids, want_ids), (V, k, temp)
            tol = 1e-12 if dtype == torch.float64 else 2e-6 * (1 + zt.abs().max().item())
            torch.testing.assert_close(lse.double(), lse64 / temp if temp == 1.0 else zt.logsumexp(-1),
                                       rtol=0, atol=tol)
            torch.testing.assert_close(lp.double(), zt.gather(1, ids) - zt.logsumexp(-1, keepdim=True),
                                       rtol=0, atol=tol)


@CPU
@pytest.mark.isa
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_topk_nonfinite_logits(dtype, topk_tile):
    """-inf logits rank below every finite one and fill a top-k longer than the finite logits (by id); a NaN
    logit makes the row's LSE and log-probs NaN and is returned only after the -inf ids; a +inf logit gives
    LSE = +inf (as logsumexp).  The ids of a row stay distinct."""
    inf, nan = float("inf"), float("nan")
    V = 37
    cases = {
        "some -inf": [(-inf if j % 3 == 0 else float(j % 5)) for j in range(V)],
        "all -inf": [-inf] * V,
        "one finite": [(-inf if j != 20 else 2.0) for j in range(V)],
        "NaN": [(nan if j % 4 == 1 else (-inf if j % 4 == 2 else float(j % 3))) for j in range(V)],
        "all NaN": [nan] * V,
        "+inf": [(inf if j == 30 else float(j % 6)) for j in range(V)],
    }
    for name, row in cases.items():
        x = torch.ones(3, 1, dtype=dtype)
        w = torch.tensor(row, dtype=dtype)[:, None]
        z = torch.tensor(row, dtype=torch.float64)
        want_lse = z.logsumexp(0)
        for k in (1, 5, 13, 30, V):
            ids, lp, lse = cpu.topk(x, w, k, LogitSpec())
            order = torch.tensor(exact_order(row)[:k])
            for r in range(3):
                assert torch.equal(ids[r], order), (name, k)
                torch.testing.assert_close(lse[r].double(), want_lse, equal_nan=True, rtol=0, atol=1e-6)
                torch.testing.assert_close(lp[r].double(), z[order] - want_lse, equal_nan=True, rtol=0, atol=1e-6)


@CPU
@pytest.mark.isa
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 8, 64, 256])
def test_cpu_topk_long_rows_fresh_inputs(k, dtype, topk_tile):
    """A 5003-entry vocabulary (several scan blocks, not a multiple of the vector width) with dominant rows at
    the start, the middle and the end, so the running maximum and the threshold move late in a row; fresh random
    inputs against the float64 logits (bf16 inputs: against the fp32 logits of the same bf16 values)."""
    N, H, V = 13, 16, 5003
    x = torch.randn(N, H, dtype=torch.float64)
    w = torch.randn(V, H, dtype=torch.float64) / H**0.5 * 2
    for j, f in ((3, 4.0), (2600, 6.0), (V - 2, 5.0)):
        w[j] *= f
    x, w = x.to(dtype), w.to(dtype)
    for logit in (LogitSpec(), LOGITS["temp_scale"]):
        ids, lp, lse = cpu.topk(x, w, k, logit)
        z = dense.logits(x.double(), w.double(), logit.temperature, logit.logit_scale, logit.softcap)
        z_plain = None if dtype == torch.float64 else dense.logits(
            x.float(), w.float(), logit.temperature, logit.logit_scale, logit.softcap)
        check_topk(ids, lp, lse, z, k, z_plain)


@CPU
@pytest.mark.isa
@pytest.mark.parametrize("off", [0.0, -40.0, 300.0, 16000.0, 16400.0, -20000.0, 1e6])
def test_cpu_topk_lse_around_the_lean_exp_limit(off):
    """The fp32 one-pass scan sums e^{z - M} as 2^(z log2(e) - fl(M log2(e))) and divides the rounding of the
    reference out afterwards, for |M| < 16384; larger maxima take the plain exponential.  Rows of many
    comparable logits (every term counts) on both sides of that limit: the LSE within a few float32 ulps of the
    float64 logsumexp of the same fp32 logits, the order exact."""
    g = torch.Generator().manual_seed(5)
    V = 3001
    spread = torch.tensor([0.01, 0.5, 2.0, 8.0, 30.0, 1.0], dtype=torch.float64)[:, None]
    Z = off + torch.randn(6, V, generator=g, dtype=torch.float64) * spread
    Z[5, 1700] += 50.0  # the running maximum jumps in a later block
    Z = Z.float()
    x, w = _rows_as_gemm(Z)
    ids, lp, lse = cpu.topk(x, w, 17, LogitSpec())
    z64 = Z.double()
    lse64 = z64.logsumexp(-1)
    tol = 2.0**-23 * lse64.abs() + 1e-6  # about one ulp of the LSE (its own rounding is half of one)
    assert ((lse.double() - lse64).abs() <= tol).all(), (lse.double() - lse64).abs().max()
    want = torch.tensor([exact_order(r.tolist())[:17] for r in z64])
    assert torch.equal(ids, want)


@CPU
@pytest.mark.parametrize("rows", ["1", "3", "7", "512"])
@pytest.mark.parametrize("tile", [None, "100"])
def test_cpu_topk_row_groups(rows, tile, monkeypatch):
    """The tiled driver's row groups (``COPSD_CPU_TOPK_ROWS``; default up to 512 rows, a multiple of the thread
    count of groups): any group size, a short last group, with whole-row and split tiles, gives the same
    answer."""
    monkeypatch.setenv("COPSD_CPU_TOPK_ROWS", rows)
    if tile is None:
        monkeypatch.delenv("COPSD_CPU_TOPK_TILE", raising=False)
    else:
        monkeypatch.setenv("COPSD_CPU_TOPK_TILE", tile)
    N, H, V, k = 13, 16, 1403, 9
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 2
    x, w = x.float(), w.float()
    ids, lp, lse = cpu.topk(x, w, k, LogitSpec())
    check_topk(ids, lp, lse, dense.logits(x.double(), w.double()), k, dense.logits(x, w))


# ----------------------------------------------------------------------------- Triton backend


@TRITON
@pytest.mark.parametrize("N,H,V,k,spec", [
    (9, 40, 101, 5, "all"),
    (3, 16, 45, 16, "plain"),
    (2, 16, 7, 7, "plain"),  # k == V
    (1, 16, 1, 1, "plain"),
])
def test_triton_topk(N, H, V, k, spec):
    spec = SPECS[spec]
    x, w = rand_lm(N, H, V, scale=3.0)
    ids, lp, lse = tri.topk(x, w, k, spec)
    check_topk(ids, lp, lse, z64_of(x, w, spec), k, tol=1e-5)


@TRITON
def test_triton_topk_ties():
    # duplicated weight rows give exactly tied logits; any tied choice is a valid top-k
    N, H, V, k = 5, 16, 40, 6
    x, w = rand_lm(N, H, V)
    w[20:] = w[:20]
    ids, lp, lse = tri.topk(x, w, k, LogitSpec())
    check_topk(ids, lp, lse, z64_of(x, w, LogitSpec()), k, tol=1e-5)


@TRITON
@path_independent
def test_triton_topk_merge_wrapper_validates_on_cpu():
    v = torch.randn(4, 10)
    i = torch.arange(40).view(4, 10)
    with pytest.raises(ValueError, match="CUDA tensors"):
        _cuda_topk.topk_merge(v, i, 3)


# ----------------------------------------------------------------------------- CUDA topk_merge (GPU)


@TRITON
@pytest.mark.gpu
@path_independent
@pytest.mark.parametrize("k,M", [(64, 1024), (1, 37), (50, 50), (100, 3000)])
def test_triton_gpu_cuda_topk_merge(k, M):
    pytest.importorskip("copsd._cuda")
    rows = 77
    vals = torch.randn(rows, M, device=DEV)
    vals[:, ::7] = vals[:, :1]  # ties
    ids = torch.randperm(rows * M, device=DEV).view(rows, M)
    v, i = _cuda_topk.topk_merge(vals, ids, k)
    ev = vals.topk(k, dim=1).values
    torch.testing.assert_close(v, ev, rtol=0, atol=0)
    torch.testing.assert_close(vals.gather(1, (ids.unsqueeze(2) == i.unsqueeze(1)).float().argmax(1)), v)
    rv, ri = torch.ops.copsd_cuda.topk_merge(vals, ids, k)  # the raw op, valid arguments
    assert torch.equal(rv, v) and torch.equal(ri, i)
    # user-facing errors come from the Python wrapper
    with pytest.raises(ValueError, match="k must be"):
        _cuda_topk.topk_merge(vals, ids, M + 1)
    with pytest.raises(ValueError, match="float32"):
        _cuda_topk.topk_merge(vals.double(), ids, k)
    with pytest.raises(ValueError, match="int64"):
        _cuda_topk.topk_merge(vals, ids.int(), k)
    with pytest.raises(ValueError, match="shape"):
        _cuda_topk.topk_merge(vals, ids[:, :-1], k)


RAW_ERROR_SCRIPT = """
import torch, copsd._cuda
v = torch.randn(3, 5, device="cuda")
i = torch.arange(15, device="cuda").view(3, 5)
try:
    torch.ops.copsd_cuda.topk_merge(v, i, 6)
except Exception as e:
    print("RAISED", type(e).__name__, str(e).splitlines()[0])
else:
    print("NO ERROR")
"""


@TRITON
@pytest.mark.gpu
@path_independent
def test_triton_gpu_cuda_topk_merge_raw_error_path_in_subprocess():
    # The C++ guard of the raw op (TORCH_CHECK_VALUE) crashed the process on the first GPU run; run
    # it in a child so that a crash is reported as this test's failure, not a dead test session.
    pytest.importorskip("copsd._cuda")
    r = subprocess.run([sys.executable, "-c", RAW_ERROR_SCRIPT], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, f"raw op error path crashed (rc {r.returncode}): {r.stderr[-1500:]}"
    assert "RAISED" in r.stdout and "k must be" in r.stdout, r.stdout
