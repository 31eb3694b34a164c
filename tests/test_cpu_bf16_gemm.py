"""The bf16 logits GEMM of the C++ CPU backend (``csrc/cpu/gemm_bf16.*``): bf16 hidden states times a bf16 lm_head
on AVX512_BF16 dot products, fp32 products and sums.

The kernel alone (``copsd._C.bf16_gemm``) and every op that forms logits from bf16 inputs are checked against
float64 with the error-relative criterion of ``tests/criteria.py``: the weight packed once per call, and streamed
panel by panel where the packed copy does not fit.  The plain computation is the fp32 GEMM of the same bf16 values
(what the backend computed before, and what the kernel must match).  Odd shapes: 1 row, 1 vocabulary row,
vocabularies and row counts that are no multiple of the 64 x 6 block, an odd hidden size whose last pair is padded,
hidden sizes past the kernel's 128-wide inner sums; large magnitudes; 1 and 2 threads.  The GEMM counters say which
path ran.  On a CPU without AVX512_BF16 (or with ``COPSD_CPU_ISA`` below avx512) the kernel tests are skipped by
name and the fallback is checked to be in effect.
"""

import os
import subprocess
import sys

import criteria
import dense
import pytest
import torch

from copsd.backends import cpu
from copsd.ops._spec import DivergenceSpec, LogitSpec

pytestmark = pytest.mark.skipif(not cpu.available(), reason="copsd._C (C++ CPU extension) is not built")
NO_KERNEL = "this CPU (or COPSD_CPU_ISA) has no AVX512_BF16: bf16 logits run on the fp32 GEMMs"
LOGIT = LogitSpec(temperature=1.3, logit_scale=0.9)


def _C():
    from copsd import _C
    return _C


def _kernel():
    if not _C().bf16_gemm_available():
        pytest.skip(NO_KERNEL)


def _bf16(*shape, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(torch.bfloat16)


@pytest.mark.parametrize("m,n,K,block,threads", [
    (1, 1, 1, 64, 1),        # one of everything
    (1, 4099, 256, 4099, 2),  # one row (the 1-row kernel), a vocabulary tail of 3
    (5, 63, 3, 64, 1),       # an odd hidden size: the last pair padded with 0
    (6, 64, 2, 64, 2),       # exactly one block, more threads than panels
    (13, 130, 255, 64, 2),   # row tail 1, vocabulary tail 2, one inner sum with a padded pair
    (17, 1000, 257, 256, 2),  # 129 pairs: 3 inner sums of <= 64 (the last padded), blocks of 256 with a tail
    (64, 2053, 1030, 1024, 2),  # 9 inner sums (the last short), 3 vocabulary blocks
    (7, 192, 64, 192, 1),    # whole panels of 32 pairs: the vector pack alone
])
@pytest.mark.parametrize("streamed", [False, True])
def test_kernel_against_float64(m, n, K, block, threads, streamed):
    """The packed weight, and the weight streamed (each panel packed right before its products)."""
    g = torch.Generator().manual_seed(m * 1_000_003 + n * 1009 + K)
    x, w = _bf16(m, K, gen=g), _bf16(n, K, gen=g)
    if not _C().bf16_gemm_available():
        with pytest.raises(RuntimeError, match="AVX512_BF16"):
            _C().bf16_gemm(x, w, block, threads, streamed)
        return
    got = _C().bf16_gemm(x, w, block, threads, streamed)
    exact = x.double() @ w.double().T
    plain = x.float() @ w.float().T
    criteria.assert_accurate(got, exact, plain, f"logits {m}x{n}x{K}", dtype=torch.float32)


@pytest.mark.parametrize("scale", [1e-3, 3e2, 2e18])
def test_kernel_magnitudes(scale):
    """Small and large operands (products up to ~1e37, sums near the fp32 range) keep the fp32 GEMM's accuracy."""
    _kernel()
    g = torch.Generator().manual_seed(int(scale * 7) % 100_003)
    x, w = _bf16(33, 300, gen=g, scale=scale), _bf16(777, 300, gen=g, scale=scale / 50)
    got = _C().bf16_gemm(x, w, 512, 2)
    exact = x.double() @ w.double().T
    plain = x.float() @ w.float().T
    assert torch.isfinite(got).all()
    criteria.assert_accurate(got, exact, plain, f"logits at scale {scale:g}", dtype=torch.float32)


def _check(got, exact, plain, what, scale=1.0):
    criteria.assert_accurate(got, exact, plain, what, dtype=torch.float32, scale=scale)


# ---- The gradient GEMMs on the kernel (COPSD_CPU_BF16_GEMM=all): dL/dz rounded to bf16, bf16 products, fp32 sums.


@pytest.mark.parametrize("m,n,H,tile", [
    (1, 1, 1, 256),          # one of everything
    (7, 1501, 301, 333),     # odd tiles (odd starts: W's row pairs packed per sub-tile), odd H, odd vocabulary
    (41, 1500, 64, 512),     # an odd row count (the last row pair padded), one whole panel of H
    (3, 700, 130, 256),      # H past two panels with a tail of 2
    (256, 4096, 256, 2048),  # the drivers' usual 256-row chunk and tile
])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("first", [True, False])
def test_grad_kernel_against_float64(monkeypatch, m, n, H, tile, packed, first):
    """d_hidden = G W and d_weight (=, +=) G^T x over vocabulary tiles as the drivers call them, with W's row pairs
    packed once per call or per sub-tile: exactly the float64 products of the bf16-rounded G, up to fp32 sums."""
    _kernel()
    monkeypatch.setenv("COPSD_CPU_BF16_GEMM", "all")
    monkeypatch.setenv("COPSD_CPU_PACK_MB", "192" if packed else "0")
    g = torch.Generator().manual_seed(m * 7919 + n * 31 + H)
    z = torch.randn(m, n, generator=g, dtype=torch.float64).float() * 1e-2
    w, x = _bf16(n, H, gen=g), _bf16(m, H, gen=g, scale=1.5)
    dw0 = None if first else torch.randn(n, H, generator=g, dtype=torch.float64).float()
    _C().gemm_stats_reset()
    dx, dw = _C().bf16_grad_tiles(z, w, x, tile, dw0)
    st = _C().gemm_stats()
    assert st["packs"] == (2 if packed else 0) and st["bf16_grads"] == 1, st  # the logits' pack and W's row pairs
    zr = z.bfloat16()  # what the kernel multiplies: round to nearest even
    for got, exact, plain, what in (
            (dx, zr.double() @ w.double(), zr.float() @ w.float(), "d_hidden"),
            (dw, zr.double().T @ x.double() + (0 if first else dw0.double()),
             zr.float().T @ x.float() + (0 if first else dw0), "d_weight")):
        _check(got, exact, plain, f"{what} {m}x{n}x{H}")


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_grad_kernel_magnitudes(monkeypatch, scale):
    """Tiny and huge dL/dz (bf16 has fp32's exponent range) keep the fp32 GEMM's accuracy."""
    _kernel()
    monkeypatch.setenv("COPSD_CPU_BF16_GEMM", "all")
    g = torch.Generator().manual_seed(5)
    z = (torch.randn(9, 800, generator=g, dtype=torch.float64) * scale).float()
    w, x = _bf16(800, 96, gen=g), _bf16(9, 96, gen=g)
    dx, dw = _C().bf16_grad_tiles(z, w, x, 512)
    zr = z.bfloat16()
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all()
    _check(dx, zr.double() @ w.double(), zr.float() @ w.float(), f"d_hidden at scale {scale:g}")
    _check(dw, zr.double().T @ x.double(), zr.float().T @ x.float(), f"d_weight at scale {scale:g}")


def test_grad_kernel_needs_the_knob(monkeypatch):
    """Without COPSD_CPU_BF16_GEMM=all the gradient products stay fp32: the kernel refuses to run."""
    _kernel()
    monkeypatch.setenv("COPSD_CPU_BF16_GEMM", "1")
    z, w, x = torch.zeros(2, 3), torch.zeros(3, 4, dtype=torch.bfloat16), torch.zeros(2, 4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="COPSD_CPU_BF16_GEMM=all"):
        _C().bf16_grad_tiles(z, w, x, 256)


H, V = 301, 1500  # an odd hidden size (3 inner sums, the last pair padded); V no multiple of 64


def _inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    xs, xt = _bf16(n, H, gen=g, scale=1.5), _bf16(n, H, gen=g, scale=1.5)
    ws, wt = _bf16(V, H, gen=g, scale=2 / H**0.5), _bf16(V, H, gen=g, scale=2 / H**0.5)
    ids = torch.randint(0, V, (n,), generator=g)
    return xs, ws, xt, wt, ids


@pytest.fixture
def path(monkeypatch):
    """Chunks of 16 rows (3 chunks for 41 tokens) and the GEMM path: 'bf16' (the default where the CPU has the
    kernel: the weight packed once per call), 'streamed' (the kernel with no room for the packed copy,
    COPSD_CPU_PACK_MB=0) or 'fp32' (COPSD_CPU_BF16_GEMM=0); resets the counters; returns a check of the counts."""
    def set_path(name, sides):
        if name != "fp32":
            _kernel()
        monkeypatch.setattr(cpu, "WORKSPACE_BYTES", 16 * sides * V * 4)
        monkeypatch.delenv("COPSD_CPU_PACK", raising=False)
        monkeypatch.delenv("COPSD_CPU_PACK_MB", raising=False)
        if name.endswith("streamed"):
            monkeypatch.setenv("COPSD_CPU_PACK_MB", "0")
        monkeypatch.setenv("COPSD_CPU_BF16_GEMM", {"fp32": "0", "all": "all", "all-streamed": "all"}.get(name, "1"))
        _C().gemm_stats_reset()

        def ran(grads=False):
            st = _C().gemm_stats()
            if name in ("bf16", "all"):
                assert st["bf16_gemms"] > 0 and st["plain_gemms"] == 0, st
            elif name.endswith("streamed"):
                assert st["bf16_gemms"] > 0 and st["packed_gemms"] == 0 and st["packs"] == 0, st
            else:
                assert st["bf16_gemms"] == 0, st
            assert (st["bf16_grads"] > 0) == (grads and name.startswith("all")), st
        return ran
    return set_path


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", ["bf16", "streamed", "fp32"])
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_divergence(path, name, kind, threads):
    n = 41
    xs, ws, xt, wt, _ = _inputs(n, seed=21)
    tg = torch.rand(n, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    tg[5] = 0.0  # a masked-out token
    div = DivergenceSpec(kind=kind, beta=0.3)
    exact = dense.divergence_grads(xs, ws, xt, wt, LOGIT, div, None, tg)
    plain = dense.divergence_grads(xs, ws, xt, wt, LOGIT, div, None, tg, dtype=torch.float32)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ran = path(name, 2)
        loss, dx, dw = cpu.divergence(xs, ws, xt, wt, LOGIT, div, None, tg.float())
        ran(True)
    finally:
        torch.set_num_threads(old)
    for got, e, p, what in zip((loss, dx, dw), exact, plain, ("loss", "d_hidden", "d_weight")):
        _check(got, e, p, f"{kind} {what}", scale=5.0 if what == "loss" else 1.0)
    assert (dx[5] == 0).all()


@pytest.mark.parametrize("name", ["bf16", "streamed", "fp32"])
@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
def test_divergence_selecting_the_teacher_top_k(path, name, kind):
    """The teacher-top-k divergence that selects its own ids (``divergence_select``) on bf16 inputs: the ids the
    top-k op returns on the same path, and loss and gradients as accurate as plain fp32 on those ids."""
    n, k = 41, 9
    xs, ws, xt, wt, _ = _inputs(n, seed=23)
    tg = torch.rand(n, generator=torch.Generator().manual_seed(24), dtype=torch.float64)
    div = DivergenceSpec(kind=kind, beta=0.3, support="teacher_topk", tail="bucket")
    ran = path(name, 2)
    loss, dx, dw, _, ids = cpu.divergence_select(xs, ws, xt, wt, LOGIT, div, k, tg.float())
    ran(True)
    assert torch.equal(ids, cpu.topk(xt, wt, k, LOGIT)[0])
    exact = dense.divergence_grads(xs, ws, xt, wt, LOGIT, div, ids, tg)
    plain = dense.divergence_grads(xs, ws, xt, wt, LOGIT, div, ids, tg, dtype=torch.float32)
    for got, e, p, what in zip((loss, dx, dw), exact, plain, ("loss", "d_hidden", "d_weight")):
        _check(got, e, p, f"{kind} top-k {what}", scale=5.0 if what == "loss" else 1.0)


@pytest.mark.parametrize("name", ["bf16", "streamed", "fp32"])
def test_logprobs_topk_and_loss(path, name):
    n = 41
    x, w, _, _, ids = _inputs(n, seed=31)
    gs = [torch.randn(n, generator=torch.Generator().manual_seed(i + 32)) for i in range(3)]
    exact = dense.logprobs_grads(x, w, ids, LOGIT, gs)
    plain = dense.logprobs_grads(x, w, ids, LOGIT, gs, dtype=torch.float32)
    ran = path(name, 1)
    lp, ent, lse = cpu.logprobs_forward(x, w, ids, LOGIT)
    ran()
    for got, e, p, what in zip((lp, ent, lse), exact[0], plain[0], ("logprobs", "entropy", "lse")):
        _check(got, e, p, what)
    ran = path(name, 1)
    dx, dw = cpu.logprobs_backward(x, w, ids, lse, ent, *[t.to(lp.dtype) for t in gs], LOGIT)
    ran(True)
    _check(dx, exact[1], plain[1], "d_hidden")
    _check(dw, exact[2], plain[2], "d_weight")
    ran = path(name, 1)
    a, b = gs[0], gs[1]
    exact = dense.logprobs_grads(x, w, ids, LOGIT, (a, b, None))
    plain = dense.logprobs_grads(x, w, ids, LOGIT, (a, b, None), dtype=torch.float32)
    lp, ent, dx, dw = cpu.logprobs_loss(x, w, ids, LOGIT, lambda r0, rows, *_: (a[r0:r0 + rows], b[r0:r0 + rows]))
    ran(True)
    for got, e, p, what in zip((lp, ent, dx, dw), (*exact[0][:2], exact[1], exact[2]),
                               (*plain[0][:2], plain[1], plain[2]), ("loss lp", "loss entropy", "loss dx", "loss dw")):
        _check(got, e, p, what)
    ran = path(name, 1)
    kw = dict(temperature=LOGIT.temperature, logit_scale=LOGIT.logit_scale)
    _, vals64, lse64 = dense.topk(x.double(), w.double(), 9, **kw)
    _, vals32, lse32 = dense.topk(x.float(), w.float(), 9, **kw)
    top_ids, vals, lse = cpu.topk(x, w, 9, LOGIT)
    ran()
    _check(vals, vals64, vals32, "top-k logprobs")
    _check(lse, lse64, lse32, "top-k lse")
    z = dense.logits(x.double(), w.double(), **kw)
    _check(vals, z.gather(1, top_ids) - z.logsumexp(-1, keepdim=True), vals32, "logprobs at the returned ids")


def _check_bf16_grad(got, exact, plain_bf16, what):
    """A gradient from the bf16 gradient GEMMs (dL/dz rounded to bf16): the FlashAttention criterion against plain
    PyTorch in bf16 (error <= 2x its error), and, sharper, within 4x the error of rounding the exact gradient to bf16
    (what returning it in bf16 costs anyway)."""
    criteria.assert_accurate(got, exact, plain_bf16, what + " (vs plain bf16)", c=2.0, dtype=torch.float32)
    criteria.assert_accurate(got, exact, exact.bfloat16(), what + " (vs bf16 rounding)", c=4.0, dtype=torch.float32)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", ["all", "all-streamed"])
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_divergence_bf16_gradients(path, name, kind, threads):
    """COPSD_CPU_BF16_GEMM=all: the loss is the default path's, bit for bit (the same logits); the gradients pass
    the low-precision criteria of _check_bf16_grad."""
    n = 41
    xs, ws, xt, wt, _ = _inputs(n, seed=23)
    tg = torch.rand(n, generator=torch.Generator().manual_seed(24), dtype=torch.float64)
    tg[5] = 0.0  # a masked-out token
    div = DivergenceSpec(kind=kind, beta=0.3)
    exact = dense.divergence_grads(xs, ws, xt, wt, LOGIT, div, None, tg)
    plain = dense.divergence_grads(xs, ws, xt, wt, LOGIT, div, None, tg, dtype=torch.bfloat16)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        path("bf16", 2)
        loss_default = cpu.divergence(xs, ws, xt, wt, LOGIT, div, None, tg.float())[0]
        ran = path(name, 2)
        loss, dx, dw = cpu.divergence(xs, ws, xt, wt, LOGIT, div, None, tg.float())
        ran(True)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(loss, loss_default)
    _check_bf16_grad(dx, exact[1], plain[1], f"{kind} d_hidden")
    _check_bf16_grad(dw, exact[2], plain[2], f"{kind} d_weight")
    assert (dx[5] == 0).all()


@pytest.mark.parametrize("name", ["all", "all-streamed"])
def test_logprobs_bf16_gradients(path, name, monkeypatch):
    """COPSD_CPU_BF16_GEMM=all in the log-prob backward (tiled, also with odd tiles) and the 3-GEMM loss."""
    n = 41
    x, w, _, _, ids = _inputs(n, seed=33)
    gs = [torch.randn(n, generator=torch.Generator().manual_seed(i + 34)) for i in range(3)]
    exact = dense.logprobs_grads(x, w, ids, LOGIT, gs)
    plain = dense.logprobs_grads(x, w, ids, LOGIT, gs, dtype=torch.bfloat16)
    path("bf16", 1)
    lp, ent, lse = cpu.logprobs_forward(x, w, ids, LOGIT)
    for tile in ("", "333"):  # the default tiles, and odd ones (odd tile starts)
        monkeypatch.setenv("COPSD_CPU_TOPK_TILE", tile)
        ran = path(name, 1)
        dx, dw = cpu.logprobs_backward(x, w, ids, lse, ent, *[t.to(lp.dtype) for t in gs], LOGIT)
        ran(True)
        _check_bf16_grad(dx, exact[1], plain[1], f"d_hidden, tiles '{tile}'")
        _check_bf16_grad(dw, exact[2], plain[2], f"d_weight, tiles '{tile}'")
    monkeypatch.delenv("COPSD_CPU_TOPK_TILE")
    a, b = gs[0], gs[1]
    exact = dense.logprobs_grads(x, w, ids, LOGIT, (a, b, None))
    plain = dense.logprobs_grads(x, w, ids, LOGIT, (a, b, None), dtype=torch.bfloat16)
    ran = path(name, 1)
    lp2, ent2, dx, dw = cpu.logprobs_loss(x, w, ids, LOGIT, lambda r0, rows, *_: (a[r0:r0 + rows], b[r0:r0 + rows]))
    ran(True)
    assert torch.equal(lp2, lp) and torch.equal(ent2, ent)
    _check_bf16_grad(dx, exact[1], plain[1], "loss d_hidden")
    _check_bf16_grad(dw, exact[2], plain[2], "loss d_weight")


def test_fp32_inputs_ignore_the_bf16_gradients(path, monkeypatch):
    """`all` changes nothing for fp32 inputs: every GEMM stays fp32."""
    xs, ws, xt, wt, _ = _inputs(41, seed=61)
    xs, ws, xt, wt = (t.float() for t in (xs, ws, xt, wt))
    path("fp32", 2)
    monkeypatch.setenv("COPSD_CPU_BF16_GEMM", "all")
    cpu.divergence(xs, ws, xt, wt, LOGIT, DivergenceSpec(), None, torch.ones(41))
    st = _C().gemm_stats()
    assert st["bf16_gemms"] == st["bf16_grads"] == 0 and st["packed_gemms"] + st["plain_gemms"] > 0, st


def test_fp32_hidden_with_bf16_weight_stays_fp32(path, monkeypatch):
    """The kernel multiplies bf16 by bf16: fp32 hidden states with a bf16 lm_head keep the fp32 GEMMs."""
    _kernel()
    n = 41
    x, w, _, _, ids = _inputs(n, seed=41)
    x = x.float() + 1e-3 * torch.randn(n, H, generator=torch.Generator().manual_seed(42))  # not bf16 values
    path("bf16", 1)
    monkeypatch.delenv("COPSD_CPU_BF16_GEMM")  # the default: the kernel wherever it applies
    lp = cpu.logprobs_forward(x, w, ids, LOGIT)[0]
    st = _C().gemm_stats()
    assert st["bf16_gemms"] == 0 and st["packed_gemms"] + st["plain_gemms"] > 0, st
    kw = dict(temperature=LOGIT.temperature, logit_scale=LOGIT.logit_scale)
    _check(lp, dense.logprobs(x.double(), w.double(), ids, **kw)[0],
           dense.logprobs(x.float(), w.float(), ids, **kw)[0], "logprobs")


def test_bad_knob_value_is_an_error(path, monkeypatch):
    """COPSD_CPU_BF16_GEMM is read for bf16 inputs on every CPU: a bad value is an error naming it."""
    x, w, _, _, ids = _inputs(41, seed=51)
    path("fp32", 1)
    monkeypatch.setenv("COPSD_CPU_BF16_GEMM", "sometimes")
    with pytest.raises(RuntimeError, match="COPSD_CPU_BF16_GEMM"):
        cpu.logprobs_forward(x, w, ids, LOGIT)


def test_isa_cap_turns_the_kernel_off():
    """COPSD_CPU_ISA=avx2 (or base) keeps bf16 logits on the fp32 GEMMs: the kernel is AVX-512 code."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "from copsd import _C; print(_C.bf16_gemm_available())"
    for level in ("avx2", "base"):
        env = dict(os.environ, COPSD_CPU_ISA=level, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.strip() == "False", (level, res.stdout, res.stderr[-2000:])
