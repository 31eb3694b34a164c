"""Cascade attention ops (values and gradients) against the dense float64 attention of ``copsd.reference``.

The reference materialises the full ``[B, Hq, S, P + S]`` score matrix (prefix keys always visible,
own keys causal, padded keys/queries masked) -- independent of the chunked cascade code under test.
Gradients: the ops' explicit backward (the registered autograd of the custom ops) against autograd through
that dense attention.
Low precision follows FlashAttention's criterion: kernel error <= 2 x the error of plain PyTorch
attention computed in the same precision (both against float64).
"""

import importlib
import os
import sys

import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through the interpreter; the kernels must be decorated in
    # interpreter mode, so re-import them if an earlier test module imported them compiled.
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("copsd_kernels.merge_attention_states", "copsd_kernels.shared_prefix_attention"):
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])

import pytest  # noqa: E402
from criteria import assert_accurate  # noqa: E402

from copsd import backends  # noqa: E402
from copsd import reference as dense  # noqa: E402
from copsd.ops.attention import merge_attention_states, shared_prefix_attention  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- dense references


# The dense references of both ops (copsd.reference, shared with the benchmarks): the full [B, Hq, S, P + S]
# score matrix materialised, and the textbook merge in float64.
dense_attention = dense.attention
merge_float64 = dense.merge_attention_states


def random_inputs(b, s, hq, hkv, d, p, dtype=torch.float32, device="cpu", mag=1.0):
    q = torch.randn(b, s, hq, d, device=device) * mag
    k = torch.randn(b, s, hkv, d, device=device) * mag
    v = torch.randn(b, s, hkv, d, device=device)
    pk = torch.randn(p, hkv, d, device=device) * mag
    pv = torch.randn(p, hkv, d, device=device)
    return tuple(t.to(dtype) for t in (q, k, v, pk, pv))


def random_lens(b, s, device="cpu"):
    lens = torch.randint(0, s + 1, (b,), device=device)
    lens[0] = s  # at least one full and (when b > 1) one empty sequence
    if b > 1:
        lens[-1] = 0
    return lens


# ----------------------------------------------------------------------------- backends under test


def _triton_ready(device):
    """Skip (with the reason) where the Triton kernels cannot run; fail if they are present but broken."""
    try:
        importlib.import_module("copsd_kernels")
    except ModuleNotFoundError:
        pytest.skip("copsd_kernels is not importable (install the package: pip install -e .)")
    importlib.import_module("copsd_kernels.shared_prefix_attention")  # a broken kernel module fails here
    if device == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 before the kernels import")
        import triton.language as tl

        from copsd_kernels import shared_prefix_attention as mod

        for what, fn in (("triton.language", tl.zeros), ("copsd_kernels", mod._attn_fwd_kernel)):
            if type(fn).__name__ != "InterpretedFunction":
                pytest.skip(f"{what} was imported before TRITON_INTERPRET=1 was set (set it in "
                            "tests/conftest.py before anything imports triton)")
    if "triton" not in backends.available_backends():
        pytest.skip(f"triton backend not usable here; available: {backends.available_backends()}")


CPU_BACKENDS = ["reference", "triton"]
# "reference-chunked": the reference with PyTorch's CPU flash kernel switched off (the autograd path)
SPA_BACKENDS = ["reference", "reference-chunked", "triton"]


def _spa_backend(backend, monkeypatch):
    """Resolve a SPA_BACKENDS name to a backend= value (and switch paths for reference-chunked)."""
    if backend == "reference-chunked":
        from copsd.backends import _reference_attention as ref

        monkeypatch.setattr(ref, "USE_CPU_FLASH", False)
        return "reference"
    _setup(backend)
    return backend


def _setup(backend, device="cpu"):
    if backend == "triton":
        _triton_ready(device)
    if backend == "cuda":
        if "cuda" not in backends.available_backends():
            pytest.skip("copsd._cuda extension not built here (needs CUDA torch + nvcc at install time)")


def _err(x, ref, rows=None):
    """Max abs error, treating matching infinities as equal."""
    x, ref = x.double(), ref.double()
    same_inf = torch.isinf(ref) & (x == ref)
    diff = torch.where(same_inf, torch.zeros_like(ref), (x - ref).abs())
    return diff.nan_to_num(float("inf")).max().item() if diff.numel() else 0.0


def check_against_dense(o, lse, q, k, v, pk, pv, scale, lens, tag, floor_o, floor_lse):
    """FlashAttention criterion: err(kernel) <= 2 err(same-precision PyTorch) + floor, both vs float64."""
    scale_ = q.shape[-1] ** -0.5 if scale is None else scale
    o64, lse64 = dense_attention(q, k, v, pk, pv, scale_, lens)
    o_pt, lse_pt = dense_attention(q, k, v, pk, pv, scale_, lens, dtype=q.dtype)
    assert o.shape == q.shape and o.dtype == q.dtype, f"{tag}: o {tuple(o.shape)} {o.dtype}"
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]), f"{tag}: lse shape {tuple(lse.shape)}"
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32), f"{tag}: {lse.dtype}"
    assert not torch.isnan(o).any() and not torch.isnan(lse).any(), f"{tag}: NaN in output"
    # tests/criteria.py with FlashAttention's own constant (2): attention has no vocabulary-sized sums
    assert_accurate(o, o64, o_pt, f"{tag}: o", c=2, floor=floor_o)
    assert_accurate(lse, lse64, lse_pt, f"{tag}: lse", c=2, floor=floor_lse)
    if lens is not None:  # padded query rows: exactly o = 0, lse = -inf
        pad = torch.arange(q.shape[1], device=q.device)[None] >= lens.to(q.device)[:, None]  # [B, S]
        assert (o[pad] == 0).all(), f"{tag}: padded rows of o are not 0"
        assert (lse.transpose(1, 2)[pad] == NEG_INF).all(), f"{tag}: padded rows of lse are not -inf"


# ----------------------------------------------------------------------------- shared_prefix_attention

SHAPES = [  # (B, S, Hq, Hkv, D, P)
    (2, 9, 4, 2, 16, 13),  # GQA
    (3, 1, 2, 2, 8, 7),  # suffix length 1
    (2, 11, 3, 1, 32, 0),  # no prefix (plain causal), multi-query
    (1, 18, 2, 1, 24, 37),  # head dim not a power of two, prefix longer than a tile
]


@pytest.mark.parametrize("backend", SPA_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}S{}Hq{}Hkv{}D{}P{}".format(*s))
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_shared_prefix_matches_dense_fp32(backend, shape, padded, monkeypatch):
    backend = _spa_backend(backend, monkeypatch)
    b, s, hq, hkv, d, p = shape
    q, k, v, pk, pv = random_inputs(b, s, hq, hkv, d, p)
    lens = random_lens(b, s) if padded else None
    o, lse = shared_prefix_attention(q, k, v, pk, pv, seq_lens=lens, backend=backend)
    check_against_dense(o, lse, q, k, v, pk, pv, None, lens, f"{backend} {shape} lens={lens}", 2e-6, 2e-6)


@pytest.mark.parametrize("backend", SPA_BACKENDS)
@pytest.mark.parametrize("scale,mag", [(25.0, 1.0), (1e-4, 1.0), (None, 30.0)],
                         ids=["peaked", "flat", "big-inputs"])
def test_shared_prefix_extreme_scores(backend, scale, mag, monkeypatch):
    backend = _spa_backend(backend, monkeypatch)
    q, k, v, pk, pv = random_inputs(2, 10, 4, 2, 16, 21, mag=mag)
    lens = torch.tensor([10, 6])
    o, lse = shared_prefix_attention(q, k, v, pk, pv, scale=scale, seq_lens=lens, backend=backend)
    tag = f"{backend} scale={scale} mag={mag}"
    check_against_dense(o, lse, q, k, v, pk, pv, scale, lens, tag, 2e-6, 2e-6)


@pytest.mark.parametrize("backend", SPA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_shared_prefix_low_precision(backend, dtype, monkeypatch):
    backend = _spa_backend(backend, monkeypatch)
    b, s, hq, hkv, d, p = 2, 12, 4, 2, 16, 19
    q, k, v, pk, pv = random_inputs(b, s, hq, hkv, d, p, dtype=dtype)
    lens = torch.tensor([12, 5])
    o, lse = shared_prefix_attention(q, k, v, pk, pv, seq_lens=lens, backend=backend)
    check_against_dense(o, lse, q, k, v, pk, pv, None, lens, f"{backend} {dtype}", 0.0, 1e-6)


@pytest.mark.parametrize("backend", ["reference", "reference-chunked"])
def test_shared_prefix_float64_reference_exact_enough(backend, monkeypatch):
    backend = _spa_backend(backend, monkeypatch)
    q, k, v, pk, pv = random_inputs(2, 7, 4, 1, 8, 5, dtype=torch.float64)
    lens = torch.tensor([7, 3])
    o, lse = shared_prefix_attention(q, k, v, pk, pv, seq_lens=lens, backend=backend)
    o64, lse64 = dense_attention(q, k, v, pk, pv, 8 ** -0.5, lens)
    assert lse.dtype == torch.float64
    assert _err(o, o64) < 1e-12 and _err(lse, lse64) < 1e-12


def test_reference_chunking_bounds_score_blocks(monkeypatch):
    """Force tiny blocks so the chunk loops (over prefix keys and query rows) run many times."""
    from copsd.backends import _reference_attention as ref

    monkeypatch.setattr(ref, "USE_CPU_FLASH", False)
    monkeypatch.setattr(ref, "_BLOCK_ELEMS", 64)
    monkeypatch.setattr(ref, "_KEY_BLOCK", 4)
    q, k, v, pk, pv = random_inputs(2, 9, 4, 2, 8, 23, dtype=torch.float64)
    lens = torch.tensor([9, 4])
    o, lse = shared_prefix_attention(q, k, v, pk, pv, seq_lens=lens, backend="reference")
    o64, lse64 = dense_attention(q, k, v, pk, pv, 8 ** -0.5, lens)
    assert _err(o, o64) < 1e-12 and _err(lse, lse64) < 1e-12


@pytest.mark.parametrize("backend", ["reference", "reference-chunked"])
def test_cascade_equals_merge_of_parts(backend, monkeypatch):
    """Cascade == merge(prefix-only state, own-tokens-only state), both parts from dense float64."""
    q, k, v, pk, pv = random_inputs(2, 6, 2, 1, 8, 9, dtype=torch.float64)
    scale = 8 ** -0.5
    o, lse = shared_prefix_attention(q, k, v, pk, pv, backend=_spa_backend(backend, monkeypatch))
    o_own, lse_own = dense_attention(q, k, v, pk[:0], pv[:0], scale, None)  # own tokens, causal
    keys = pk.repeat_interleave(2, dim=1)  # prefix only, every query sees all of it (Hq / Hkv = 2)
    vals = pv.repeat_interleave(2, dim=1)
    sc = torch.einsum("bshd,phd->bhsp", q, keys) * scale
    lse_pre = torch.logsumexp(sc, -1)
    o_pre = torch.einsum("bhsp,phd->bshd", torch.softmax(sc, -1), vals)
    o_m, lse_m = merge_float64(o_pre, lse_pre, o_own, lse_own)
    assert _err(o, o_m) < 1e-12 and _err(lse, lse_m) < 1e-12


def test_reference_gradients_float64():
    q, k, v, pk, pv = random_inputs(1, 4, 2, 1, 4, 3, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (q, k, v, pk, pv))
    assert torch.autograd.gradcheck(lambda *x: shared_prefix_attention(*x), inputs)


def _dense_grads(inputs, lens, scale, w_o, w_lse, dtype):
    """Gradients of ``sum(w_o * o) + sum(w_lse * lse)`` (lse = -inf rows left out) through the dense attention."""
    xs = tuple(t.detach().to(dtype).requires_grad_() for t in inputs)
    o, lse = dense_attention(*xs, scale, lens, dtype=dtype)
    total = (o * w_o.to(dtype)).sum() + torch.where(torch.isfinite(lse), lse * w_lse.to(dtype), 0).sum()
    return torch.autograd.grad(total, xs)


@pytest.mark.parametrize("backend", ["reference", "reference-chunked"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}S{}Hq{}Hkv{}D{}P{}".format(*s))
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_shared_prefix_gradients_match_dense(backend, shape, padded, dtype, monkeypatch):
    """The explicit backward (registered autograd of the custom op) against autograd through the dense
    attention: float64 to 1e-10, float32 by the error-relative criterion; o and lse both carry gradient."""
    backend = _spa_backend(backend, monkeypatch)
    b, s, hq, hkv, d, p = shape
    inputs = random_inputs(b, s, hq, hkv, d, p, dtype=dtype)
    lens = random_lens(b, s) if padded else None
    w_o, w_lse = torch.randn(b, s, hq, d, dtype=torch.float64), torch.randn(b, hq, s, dtype=torch.float64)
    xs = tuple(t.clone().requires_grad_() for t in inputs)
    o, lse = shared_prefix_attention(*xs, seq_lens=lens, backend=backend)
    total = (o * w_o.to(dtype)).sum() + torch.where(torch.isfinite(lse), lse * w_lse.to(dtype), 0).sum()
    got = torch.autograd.grad(total, xs)
    exact = _dense_grads(inputs, lens, d ** -0.5, w_o, w_lse, torch.float64)
    plain = _dense_grads(inputs, lens, d ** -0.5, w_o, w_lse, dtype)
    for name, g_got, g_exact, g_plain in zip(("q", "k", "v", "prefix_k", "prefix_v"), got, exact, plain):
        assert g_got.dtype == dtype and g_got.shape == g_exact.shape, name
        if dtype == torch.float64:
            assert _err(g_got, g_exact) < 1e-10, f"{backend} {shape} d{name}: {_err(g_got, g_exact):.3e}"
        else:
            assert_accurate(g_got, g_exact, g_plain, f"{backend} {shape} d{name}", c=2)
    if lens is not None:  # keys past a sequence's length get no gradient
        pad = torch.arange(s)[None] >= lens[:, None]
        assert (got[1][pad] == 0).all() and (got[2][pad] == 0).all() and (got[0][pad] == 0).all()


def test_shared_prefix_backward_chunk_loops(monkeypatch):
    """Tiny blocks: the backward's loops over query rows and prefix keys run many times."""
    from copsd.backends import _reference_attention as ref

    monkeypatch.setattr(ref, "_BLOCK_ELEMS", 64)
    monkeypatch.setattr(ref, "_KEY_BLOCK", 4)
    inputs = random_inputs(2, 9, 4, 2, 8, 23, dtype=torch.float64)
    lens = torch.tensor([9, 4])
    w_o, w_lse = torch.randn(2, 9, 4, 8, dtype=torch.float64), torch.randn(2, 4, 9, dtype=torch.float64)
    xs = tuple(t.clone().requires_grad_() for t in inputs)
    o, lse = shared_prefix_attention(*xs, seq_lens=lens, backend="reference")
    got = torch.autograd.grad((o * w_o).sum() + torch.where(torch.isfinite(lse), lse * w_lse, 0).sum(), xs)
    for g_got, g_exact in zip(got, _dense_grads(inputs, lens, 8 ** -0.5, w_o, w_lse, torch.float64)):
        assert _err(g_got, g_exact) < 1e-10


def test_merge_gradients_match_autograd_and_empty_rows_get_zero():
    """The explicit merge backward against autograd through the float64 textbook merge (rows where both
    sides are finite); rows empty on both sides get zero gradient and no NaN, one empty side gets zero."""
    o_a, lse_a = random_state(2, 5, 3, 8, dtype=torch.float64, empty_frac=0.0)
    o_b, lse_b = random_state(2, 5, 3, 8, dtype=torch.float64, empty_frac=0.0)
    lse_a, lse_b = lse_a.double(), lse_b.double()
    w_o, w_lse = torch.randn(2, 5, 3, 8, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    xs = tuple(t.clone().requires_grad_() for t in (o_a, lse_a, o_b, lse_b))
    o, lse = merge_attention_states(*xs, backend="reference")
    got = torch.autograd.grad((o * w_o).sum() + (lse * w_lse).sum(), xs)
    ys = tuple(t.clone().requires_grad_() for t in (o_a, lse_a, o_b, lse_b))
    o64, lse64 = merge_float64(*ys)
    want = torch.autograd.grad((o64 * w_o).sum() + (lse64 * w_lse).sum(), ys)
    for g_got, g_want in zip(got, want):
        assert _err(g_got, g_want) < 1e-12
    lse_a2, lse_b2 = lse_a.clone(), lse_b.clone()
    lse_a2[0, 0, :] = NEG_INF
    lse_b2[0, 0, :] = NEG_INF  # both empty
    lse_a2[1, 1, 2] = NEG_INF  # one empty side
    xs = tuple(t.clone().requires_grad_() for t in (o_a, lse_a2, o_b, lse_b2))
    o, lse = merge_attention_states(*xs, backend="reference")
    got = torch.autograd.grad((o * w_o).sum() + torch.where(torch.isfinite(lse), lse * w_lse, 0).sum(), xs)
    assert not any(g.isnan().any() for g in got)
    assert (got[0][0, :, 0] == 0).all() and (got[2][0, :, 0] == 0).all()
    assert (got[1][0, 0] == 0).all() and (got[3][0, 0] == 0).all()
    assert got[0][1, 2, 1].abs().sum() == 0 and got[1][1, 1, 2] == 0 and got[2][1, 2, 1].abs().sum() > 0


def test_merge_gradcheck():
    o_a, lse_a = random_state(1, 3, 2, 4, dtype=torch.float64, empty_frac=0.0)
    o_b, lse_b = random_state(1, 3, 2, 4, dtype=torch.float64, empty_frac=0.0)
    xs = tuple(t.double().requires_grad_() for t in (o_a, lse_a, o_b, lse_b))
    assert torch.autograd.gradcheck(lambda *x: merge_attention_states(*x, backend="reference"), xs)


def test_kernel_backend_refuses_grad():
    _setup("triton")
    q, k, v, pk, pv = random_inputs(1, 4, 2, 1, 16, 3)
    q.requires_grad_()
    with pytest.raises(ValueError, match="requires grad"):
        shared_prefix_attention(q, k, v, pk, pv, backend="triton")


# ----------------------------------------------------------------------------- merge_attention_states


def random_state(b, s, h, d, dtype=torch.float32, device="cpu", empty_frac=0.25):
    o = torch.randn(b, s, h, d, device=device).to(dtype)
    lse = torch.randn(b, h, s, device=device) * 4
    lse[torch.rand(b, h, s, device=device) < empty_frac] = NEG_INF  # empty key subsets
    return o, lse


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_merge_matches_formula_and_empty_rows(backend):
    _setup(backend)
    o_a, lse_a = random_state(2, 5, 3, 24)
    o_b, lse_b = random_state(2, 5, 3, 24)
    lse_a[0, 0, :] = NEG_INF
    lse_b[0, 0, :] = NEG_INF  # both empty -> (0, -inf)
    lse_a[1, 2, 1], lse_b[1, 2, 1] = 1e4, -1e4  # far apart: no overflow
    o, lse = merge_attention_states(o_a, lse_a, o_b, lse_b, backend=backend)
    o64, lse64 = merge_float64(o_a, lse_a, o_b, lse_b)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert lse.dtype == torch.float32 and o.dtype == o_a.dtype
    lse_mag = lse64[torch.isfinite(lse64)].abs().max().item()
    assert _err(o, o64) < 1e-5 and _err(lse, lse64) < 1e-5 * (1 + lse_mag)
    assert (o[0, :, 0] == 0).all() and (lse[0, 0] == NEG_INF).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_merge_associative_and_commutative(backend):
    _setup(backend)
    a, b, c = (random_state(2, 7, 2, 16) for _ in range(3))

    def m(x, y):
        return merge_attention_states(*x, *y, backend=backend)

    left, right = m(m(a, b), c), m(a, m(b, c))
    assert _err(left[0], right[0]) < 1e-5 and _err(left[1], right[1]) < 1e-5
    ab, ba = m(a, b), m(b, a)
    assert _err(ab[0], ba[0]) < 1e-6 and _err(ab[1], ba[1]) < 1e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_merge_of_kv_split_equals_whole(backend):
    """Attention over keys A and over keys B, merged, equals attention over A + B (float64 truth)."""
    _setup(backend)
    b, s, h, d, n = 2, 5, 3, 16, 11
    q = torch.randn(b, s, h, d, dtype=torch.float64)
    kv = torch.randn(2, b, n, h, d, dtype=torch.float64)

    def state(keys, vals):
        sc = torch.einsum("bshd,bnhd->bhsn", q, keys) * d ** -0.5
        return torch.einsum("bhsn,bnhd->bshd", torch.softmax(sc, -1), vals), torch.logsumexp(sc, -1)

    o_all, lse_all = state(kv[0], kv[1])
    o_a, lse_a = state(kv[0][:, :4], kv[1][:, :4])
    o_b, lse_b = state(kv[0][:, 4:], kv[1][:, 4:])
    o, lse = merge_attention_states(o_a.float(), lse_a.float(), o_b.float(), lse_b.float(), backend=backend)
    assert _err(o, o_all) < 1e-5 and _err(lse, lse_all) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_merge_low_precision(backend, dtype):
    """o in the input dtype: error within one rounding of the float64 result (plus fp32 arithmetic)."""
    _setup(backend)
    o_a, lse_a = random_state(2, 6, 2, 32, dtype=dtype)
    o_b, lse_b = random_state(2, 6, 2, 32, dtype=dtype)
    o, lse = merge_attention_states(o_a, lse_a, o_b, lse_b, backend=backend)
    o64, lse64 = merge_float64(o_a, lse_a, o_b, lse_b)
    assert o.dtype == dtype and lse.dtype == torch.float32
    ulp = torch.finfo(dtype).eps  # truncating (interpreter) or rounding: within one ulp of |o|
    bound = ulp * o64.abs() + 1e-6
    assert ((o.double() - o64).abs() <= bound).all(), f"{backend} {dtype}: merge error beyond one ulp"
    assert _err(lse, lse64) < 1e-5


def test_merge_float64_keeps_precision():
    o_a, lse_a = random_state(1, 3, 2, 8, dtype=torch.float64)
    o_b, lse_b = random_state(1, 3, 2, 8, dtype=torch.float64)
    lse_a, lse_b = lse_a.double(), lse_b.double()
    o, lse = merge_attention_states(o_a, lse_a, o_b, lse_b, backend="reference")
    o64, lse64 = merge_float64(o_a, lse_a, o_b, lse_b)
    assert o.dtype == torch.float64 and lse.dtype == torch.float64
    assert _err(o, o64) < 1e-12 and _err(lse, lse64) < 1e-12


# ----------------------------------------------------------------------------- bad input


def _spa_args():
    q, k, v, pk, pv = random_inputs(2, 4, 4, 2, 8, 3)
    return dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv)


SPA_BAD = [  # (argument name expected in the message, override)
    ("q", dict(q=[1.0])),
    ("q", dict(q=torch.randn(2, 4, 8))),
    ("q", dict(q=torch.ones(2, 4, 4, 8, dtype=torch.int32))),
    ("q", dict(q=torch.randn(0, 4, 4, 8))),
    ("k", dict(k=torch.randn(3, 4, 2, 8))),
    ("k", dict(k=torch.randn(2, 5, 2, 8))),
    ("k", dict(k=torch.randn(2, 4, 2, 6))),
    ("Hkv", dict(k=torch.randn(2, 4, 3, 8), v=torch.randn(2, 4, 3, 8))),
    ("k", dict(k=torch.randn(2, 4, 2, 8, dtype=torch.float64))),
    ("v", dict(v=torch.randn(2, 4, 1, 8))),
    ("v", dict(v=torch.randn(2, 4, 2, 8, dtype=torch.bfloat16))),
    ("prefix_k", dict(prefix_k=torch.randn(3, 1, 8))),
    ("prefix_k", dict(prefix_k=torch.randn(3, 2, 4))),
    ("prefix_k", dict(prefix_k=torch.randn(3, 16))),
    ("prefix_k", dict(prefix_k=torch.randn(3, 2, 8, dtype=torch.float16))),
    ("prefix_v", dict(prefix_v=torch.randn(4, 2, 8))),
    ("prefix_v", dict(prefix_v=None)),
    ("k", dict(k=torch.randn(2, 4, 2, 8, device="meta"))),
    ("scale", dict(scale=0.0)),
    ("scale", dict(scale=float("nan"))),
    ("scale", dict(scale=-1.0)),
    ("scale", dict(scale="big")),
    ("seq_lens", dict(seq_lens=torch.tensor([4]))),
    ("seq_lens", dict(seq_lens=torch.tensor([4.0, 2.0]))),
    ("seq_lens", dict(seq_lens=torch.tensor([5, 2]))),
    ("seq_lens", dict(seq_lens=torch.tensor([-1, 2]))),
    ("seq_lens", dict(seq_lens=[4, 2])),
    ("backend", dict(backend="nonexistent")),
    ("backend", dict(backend=3)),
]


@pytest.mark.parametrize("name,override", SPA_BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SPA_BAD)])
def test_shared_prefix_bad_input(name, override):
    args = _spa_args()
    args.update(override)
    q, k, v, pk, pv = (args.pop(n) for n in ("q", "k", "v", "prefix_k", "prefix_v"))
    with pytest.raises(ValueError, match=name):
        shared_prefix_attention(q, k, v, pk, pv, **args)


def _merge_args():
    o_a, lse_a = random_state(2, 3, 4, 8)
    o_b, lse_b = random_state(2, 3, 4, 8)
    return dict(o_a=o_a, lse_a=lse_a, o_b=o_b, lse_b=lse_b)


MERGE_BAD = [
    ("o_a", dict(o_a="x")),
    ("o_a", dict(o_a=torch.randn(2, 3, 4))),
    ("o_a", dict(o_a=torch.ones(2, 3, 4, 8, dtype=torch.int64))),
    ("o_b", dict(o_b=torch.randn(2, 3, 4, 9))),
    ("o_b", dict(o_b=torch.randn(2, 3, 4, 8, dtype=torch.bfloat16))),
    ("lse_a", dict(lse_a=torch.randn(2, 3, 4))),  # [B, S, H] instead of [B, H, S]
    ("lse_a", dict(lse_a=torch.randn(2, 4, 3, dtype=torch.float16))),
    ("lse_b", dict(lse_b=torch.randn(2, 4))),
    ("lse_b", dict(lse_b=torch.randn(2, 4, 3, dtype=torch.float64))),
    ("lse_b", dict(lse_b=torch.randn(2, 4, 3, device="meta"))),
    ("backend", dict(backend="nope")),
]


@pytest.mark.parametrize("name,override", MERGE_BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(MERGE_BAD)])
def test_merge_bad_input(name, override):
    args = _merge_args()
    args.update(override)
    backend = args.pop("backend", "auto")
    with pytest.raises(ValueError, match=name):
        merge_attention_states(args["o_a"], args["lse_a"], args["o_b"], args["lse_b"], backend=backend)


# ----------------------------------------------------------------------------- GPU (real kernels)

GPU_SHAPES = [  # (B, S, Hq, Hkv, D, P): realistic head dims, tiles with ragged edges
    (4, 130, 8, 2, 64, 300),
    (3, 77, 4, 4, 128, 515),
    (2, 1, 8, 1, 128, 1000),
    (5, 200, 4, 2, 80, 0),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}S{}Hq{}Hkv{}D{}P{}".format(*s))
def test_gpu_shared_prefix(backend, dtype, shape):
    _setup("triton", "cuda")
    b, s, hq, hkv, d, p = shape
    q, k, v, pk, pv = random_inputs(b, s, hq, hkv, d, p, dtype=dtype, device="cuda")
    lens = random_lens(b, s, device="cuda")
    o, lse = shared_prefix_attention(q, k, v, pk, pv, seq_lens=lens, backend=backend)
    torch.cuda.synchronize()
    floor = 1e-5 if dtype == torch.float32 else 0.0
    check_against_dense(o, lse, q, k, v, pk, pv, None, lens, f"gpu {backend} {dtype} {shape}", floor, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_merge(backend, dtype):
    _setup(backend, "cuda")
    o_a, lse_a = random_state(3, 70, 8, 128, dtype=dtype, device="cuda")
    o_b, lse_b = random_state(3, 70, 8, 128, dtype=dtype, device="cuda")
    lse_a[0, 0], lse_b[0, 0] = NEG_INF, NEG_INF
    o, lse = merge_attention_states(o_a, lse_a, o_b, lse_b, backend=backend)
    torch.cuda.synchronize()
    o64, lse64 = merge_float64(o_a, lse_a, o_b, lse_b)
    assert o.dtype == dtype and lse.dtype == torch.float32, f"{backend}: dtypes {o.dtype} {lse.dtype}"
    assert not torch.isnan(o).any() and not torch.isnan(lse).any(), f"{backend} {dtype}: NaN"
    # one rounding to the output dtype, plus the weights' error relative to the summands' size (GPU
    # exp/log are fast approximations: a few ulp of fp32, growing with |lse_a - lse_b|)
    wa = torch.exp(lse_a.double() - lse64).nan_to_num(0.0).transpose(1, 2).unsqueeze(-1)
    wb = torch.exp(lse_b.double() - lse64).nan_to_num(0.0).transpose(1, 2).unsqueeze(-1)
    size = wa * o_a.double().abs() + wb * o_b.double().abs()
    bound = torch.finfo(dtype).eps * o64.abs() + 2e-5 * size + 1e-7
    worst = ((o.double() - o64).abs() - bound).max().item()
    assert worst <= 0, f"{backend} {dtype}: merge error exceeds the bound by {worst:.3e}"
    assert _err(lse, lse64) < 1e-5, f"{backend} {dtype}: lse error {_err(lse, lse64):.3e}"
    assert (o[0, :, 0] == 0).all() and (lse[0, 0] == NEG_INF).all(), f"{backend}: empty rows not (0, -inf)"

    def m(x, y):
        return merge_attention_states(*x, *y, backend=backend)

    a, b, c = (o_a, lse_a), (o_b, lse_b), random_state(3, 70, 8, 128, dtype=dtype, device="cuda")
    left, right = m(m(a, b), c), m(a, m(b, c))
    tol = 4 * torch.finfo(dtype).eps + 1e-4
    assert _err(left[1], right[1]) < 1e-5, f"{backend} {dtype}: merge not associative in lse"
    assert (left[0].double() - right[0].double()).abs().max().item() <= tol * (1 + o64.abs().max().item()), (
        f"{backend} {dtype}: merge not associative in o")


# ----------------------------------------------------------------------------- GPU compile check on CPU

_AOT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from copsd_kernels.merge_attention_states import _merge_kernel
from copsd_kernels.shared_prefix_attention import _attn_fwd_kernel

target = GPUTarget("cuda", 90, 32)
names = ["q_ptr", "k_ptr", "v_ptr", "o_ptr", "lse_ptr", "lens_ptr", "qk_scale", "n_rows", "S", "HQ", "HKV",
         "N_KEYS"]
for dt, out, causal, lens, d, g, bm, bn, warps, stages in [
        ("bf16", "fp32", False, True, 64, 4, 128, 64, 4, 3),  # prefix part, GQA, bf16 tensor cores
        ("fp32", "fp32", True, True, 80, 2, 64, 32, 4, 2)]:  # suffix part, causal, padded head dim
    types = [f"*{dt}"] * 3 + [f"*{out}", "*fp32", "*i32", "fp32"] + ["i32"] * 5
    consts = dict(G=g, D=d, CAUSAL=causal, HAS_LENS=lens, DOT_F32=False, IEEE=dt == "fp32",
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=triton.next_power_of_2(d))
    sig = dict(zip(names, types), **{c: "constexpr" for c in consts})
    triton.compile(ASTSource(fn=_attn_fwd_kernel, signature=sig, constexprs=consts), target=target,
                   options=dict(num_warps=warps, num_stages=stages))
sig = {n: t for n, t in zip(["o_a_ptr", "lse_a_ptr", "o_b_ptr", "lse_b_ptr", "o_ptr", "lse_ptr"],
                            ["*bf16", "*fp32", "*bf16", "*fp32", "*bf16", "*fp32"])}
sig.update(n_rows="i32", S="i32", H="i32", D="i32", BLOCK_R="constexpr", BLOCK_D="constexpr")
triton.compile(ASTSource(fn=_merge_kernel, signature=sig, constexprs=dict(BLOCK_R=32, BLOCK_D=128)),
               target=target, options=dict(num_warps=4))
print("compiled")
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernels are compiled and run by the gpu tests")
def test_triton_kernels_compile_for_sm90():
    """Compile the Triton kernels for an H100 (sm_90) without a GPU: catches lowering errors the
    interpreter cannot see (dtype of tl.dot operands, loop-carried types, shared-memory size)."""
    import subprocess

    try:
        importlib.import_module("copsd_kernels")
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"cannot compile ahead of time here: {e}")
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-4000:]
