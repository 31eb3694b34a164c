"""The C++ CPU backend's chunk GEMMs with and without the packed lm_head (``COPSD_CPU_PACK``, ``COPSD_CPU_PACK_MB``).

Every op of the backend (log-probs forward / backward, the 3-GEMM ``logprobs_loss``, top-k, divergence with and
without gradient) is run at 1 chunk, 2 chunks and 3 chunks with a short last chunk, fp32 / fp64 / bf16 inputs,
packing on, off and out of budget; values and gradients are compared with float64 (error-relative criterion of
``tests/criteria.py`` for fp32 / bf16, ~1e-9 for fp64).  The GEMM counters of ``copsd._C`` say which path ran,
so a packed-path test cannot silently test the fallback: where torch's MKL exports the packed-GEMM API the
counters must show packed GEMMs; where it does not (another BLAS) they must show none, and the results must
be the same either way.
"""

import math

import criteria
import dense
import pytest
import torch
from oplib import cpu_inputs

from copsd.backends import cpu
from copsd.ops._spec import DivergenceSpec, LogitSpec

pytestmark = pytest.mark.skipif(not cpu.available(), reason="copsd._C (C++ CPU extension) is not built")

H, V, ROWS = 24, 2053, 16  # V > 1024: the last chunk of 9 rows takes the blocked d_hidden path
CHUNKS = {1: 16, 2: 32, 3: 41}  # chunks -> tokens (3 chunks: 16 + 16 + 9)
LOGIT = LogitSpec(temperature=1.3, logit_scale=0.9)


def _C():
    from copsd import _C
    return _C


def _packing():
    """Whether fp32 lm_heads are packed once per call here: on copsd's own fp32 kernel (AVX-512) or MKL's packed
    GEMM (where torch's MKL exports it)."""
    return _C().f32_gemm_available() or _C().packed_gemm_available()


@pytest.fixture
def mode(monkeypatch):
    """Sets the workspace to ROWS rows per side and the packing mode: 'on' (default budget; fp32 logits on copsd's
    fp32 kernel where the CPU has AVX-512, bf16 inputs on the bf16 logits GEMM where the CPU has it), 'fp32' (the
    same with COPSD_CPU_BF16_GEMM=0: bf16 inputs only), 'mkl' (COPSD_CPU_F32_GEMM=0 and COPSD_CPU_BF16_GEMM=0: MKL's
    packed GEMM; not for fp64), 'off' (COPSD_CPU_PACK=0) or 'tiny' (COPSD_CPU_PACK_MB=0: nothing fits).  Resets the
    GEMM counters."""
    def set_mode(name, dtype, sides):
        if name == "fp32" and dtype != torch.bfloat16:
            pytest.skip("'fp32' differs from 'on' for bf16 inputs only")
        if name == "mkl" and dtype == torch.float64:
            pytest.skip("'mkl' differs from 'on' for fp32 GEMMs only")
        elem = 8 if dtype == torch.float64 else 4
        monkeypatch.setattr(cpu, "WORKSPACE_BYTES", ROWS * sides * V * elem)
        monkeypatch.delenv("COPSD_CPU_PACK", raising=False)
        monkeypatch.delenv("COPSD_CPU_PACK_MB", raising=False)
        monkeypatch.delenv("COPSD_CPU_BF16_GEMM", raising=False)
        monkeypatch.delenv("COPSD_CPU_F32_GEMM", raising=False)
        if name == "fp32":
            monkeypatch.setenv("COPSD_CPU_BF16_GEMM", "0")
        elif name == "mkl":
            monkeypatch.setenv("COPSD_CPU_BF16_GEMM", "0")
            monkeypatch.setenv("COPSD_CPU_F32_GEMM", "0")
        elif name == "off":
            monkeypatch.setenv("COPSD_CPU_PACK", "0")
        elif name == "tiny":
            monkeypatch.setenv("COPSD_CPU_PACK_MB", "0")
        _C().gemm_stats_reset()
    return set_mode


def _expect_path(name, dtype, chunks, lm_heads):
    """The counters after one op call: packed chunk GEMMs exactly where packing applies (copsd's fp32 kernel or
    MKL's packed fp32 GEMM, or for bf16 inputs the bf16 GEMM's packed copy where the CPU has it); every fp32 chunk
    GEMM on copsd's fp32 kernel wherever it runs (not in mode 'mkl'): from the packed copy, or streamed from the
    weight where there is none (counted as unpacked); and for bf16 inputs every chunk GEMM on the bf16 kernel where
    the CPU has it (unless COPSD_CPU_BF16_GEMM=0), packed or streamed the same way."""
    st = _C().gemm_stats()
    bf16 = name not in ("fp32", "mkl") and dtype == torch.bfloat16 and _C().bf16_gemm_available()
    packs = (name in ("on", "fp32", "mkl") and dtype != torch.float64 and chunks >= 2 and (bf16 or _packing()))
    f32 = dtype != torch.float64 and not bf16 and _C().f32_gemm_available()  # the mode's env is still set here
    assert st["packs"] == (lm_heads if packs else 0), st
    assert st["packed_gemms"] == (lm_heads * chunks if packs else 0), st
    assert st["plain_gemms"] == (0 if packs else lm_heads * chunks), st
    assert st["bf16_gemms"] == (lm_heads * chunks if bf16 else 0), st
    assert st["f32_gemms"] == (lm_heads * chunks if f32 else 0), st


def _tiled_groups(n):
    """Row groups of the top-k and the log-prob forward: at most ROWS rows (the workspace), and at least one
    group per thread.  (The tiled log-prob backward takes groups of ROWS rows: one per chunk.)"""
    return -(-n // min(ROWS, -(-n // torch.get_num_threads())))


def _inputs(n, dtype, seed=0, v=V):
    return cpu_inputs(n, H, v, dtype, scale=1.5, seed=seed, dominant=7, ids=True)  # row 7: a dominant vocabulary row


def _check(got, exact, plain, dtype, what, scale=1.0):
    if dtype == torch.float64:
        torch.testing.assert_close(got.double(), exact.double(), rtol=1e-9, atol=1e-11, msg=lambda m: f"{what}: {m}")
    else:
        criteria.assert_accurate(got, exact, plain, what, dtype=torch.float32, scale=scale)


DTYPES = [torch.float32, torch.float64, torch.bfloat16]
MODES = ["on", "fp32", "mkl", "off", "tiny"]


@pytest.mark.parametrize("chunks", list(CHUNKS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", MODES)
def test_logprobs_forward_backward(mode, name, dtype, chunks):
    n = CHUNKS[chunks]
    x, w, _, _, ids = _inputs(n, dtype)
    gs = [torch.randn(n, generator=torch.Generator().manual_seed(i + 5)) for i in range(3)]
    exact = dense.logprobs_grads(x, w, ids, LOGIT, gs)
    plain = dense.logprobs_grads(x, w, ids, LOGIT, gs, dtype=torch.float32)
    mode(name, dtype, 1)
    lp, ent, lse = cpu.logprobs_forward(x, w, ids, LOGIT)
    _expect_path(name, dtype, _tiled_groups(n), 1)  # the forward is tiled like the top-k
    for got, e, p, what in zip((lp, ent, lse), exact[0], plain[0], ("logprobs", "entropy", "lse")):
        _check(got, e, p, dtype, what)
    _C().gemm_stats_reset()
    g = [t.to(lp.dtype) for t in gs]
    dx, dw = cpu.logprobs_backward(x, w, ids, lse, ent, *g, LOGIT)
    _expect_path(name, dtype, chunks, 1)
    _check(dx, exact[1], plain[1], dtype, "d_hidden")
    _check(dw, exact[2], plain[2], dtype, "d_weight")


@pytest.mark.parametrize("chunks", list(CHUNKS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", MODES)
def test_logprobs_loss(mode, name, dtype, chunks):
    n = CHUNKS[chunks]
    x, w, _, _, ids = _inputs(n, dtype, seed=1)
    a = torch.randn(n, generator=torch.Generator().manual_seed(11))
    b = torch.randn(n, generator=torch.Generator().manual_seed(12))
    exact = dense.logprobs_grads(x, w, ids, LOGIT, (a, b, None))
    plain = dense.logprobs_grads(x, w, ids, LOGIT, (a, b, None), dtype=torch.float32)
    mode(name, dtype, 1)
    seen = []

    def coeff(r0, rows, lp_c, ent_c):
        seen.append((r0, rows))
        return a[r0:r0 + rows], b[r0:r0 + rows]

    lp, ent, dx, dw = cpu.logprobs_loss(x, w, ids, LOGIT, coeff)
    _expect_path(name, dtype, chunks, 1)
    assert len(seen) == chunks and sum(r for _, r in seen) == n
    _check(lp, exact[0][0], plain[0][0], dtype, "logprobs")
    _check(ent, exact[0][1], plain[0][1], dtype, "entropy")
    _check(dx, exact[1], plain[1], dtype, "d_hidden")
    _check(dw, exact[2], plain[2], dtype, "d_weight")


@pytest.mark.parametrize("tile", [None, 100])
@pytest.mark.parametrize("chunks", list(CHUNKS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", MODES)
def test_topk(mode, monkeypatch, name, dtype, chunks, tile):
    """Top-k per chunk and vocabulary tile (the default tile holds the whole V = 2053 here; 100 splits it into 21
    tiles, the last one short), the lm_head packed / up-cast per tile."""
    n, k = CHUNKS[chunks], 7
    if tile is None:
        monkeypatch.delenv("COPSD_CPU_TOPK_TILE", raising=False)
    else:
        monkeypatch.setenv("COPSD_CPU_TOPK_TILE", str(tile))
    x, w, _, _, _ = _inputs(n, dtype, seed=2)
    kw = dict(temperature=LOGIT.temperature, logit_scale=LOGIT.logit_scale)
    _, vals64, lse64 = dense.topk(x.double(), w.double(), k, **kw)
    _, vals32, lse32 = dense.topk(x.float(), w.float(), k, **kw)
    mode(name, dtype, 1)
    ids, vals, lse = cpu.topk(x, w, k, LOGIT)
    _expect_path(name, dtype, _tiled_groups(n), 1)
    _check(vals, vals64, vals32, dtype, "top-k logprobs")
    _check(lse, lse64, lse32, dtype, "lse")
    # the returned ids hold the returned values (ties may pick either id of equal logits)
    z = dense.logits(x.double(), w.double(), **kw)
    at_ids = z.gather(1, ids) - z.logsumexp(-1, keepdim=True)
    _check(vals, at_ids, vals32, dtype, "logprobs at the returned ids")


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_tile_runs_in_the_ops(monkeypatch, dtype, dynamic, threads):
    """The gradient GEMMs per vocabulary tile (divergence, recomputing log-prob backward, loss path), with 21 tiles
    of 100 entries (COPSD_CPU_TOPK_TILE): handed out one tile per run (the default; one d_hidden partial per tile), or
    with COPSD_CPU_DYNAMIC=0 one fixed run of ~10 tiles per thread, each partial summed over its run's tiles; both
    against float64, on 3 chunks."""
    n = CHUNKS[3]
    xs, ws, xt, wt, ids = _inputs(n, dtype, seed=21)
    tg = torch.rand(n, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    gs = [torch.randn(n, generator=torch.Generator().manual_seed(i + 23)) for i in range(3)]
    a, b = gs[0], gs[1]
    div = DivergenceSpec(kind="jsd", beta=0.3)
    exact_div = dense.divergence_grads(xs, ws, xt, wt, LOGIT, div, None, tg)
    plain_div = dense.divergence_grads(xs, ws, xt, wt, LOGIT, div, None, tg, dtype=torch.float32)
    exact_lp = dense.logprobs_grads(xs, ws, ids, LOGIT, gs)
    plain_lp = dense.logprobs_grads(xs, ws, ids, LOGIT, gs, dtype=torch.float32)
    exact_loss = dense.logprobs_grads(xs, ws, ids, LOGIT, (a, b, None))
    plain_loss = dense.logprobs_grads(xs, ws, ids, LOGIT, (a, b, None), dtype=torch.float32)
    elem = 8 if dtype == torch.float64 else 4
    monkeypatch.setattr(cpu, "WORKSPACE_BYTES", ROWS * 2 * V * elem)
    monkeypatch.setenv("COPSD_CPU_TOPK_TILE", "100")
    if dynamic:
        monkeypatch.delenv("COPSD_CPU_DYNAMIC", raising=False)
    else:
        monkeypatch.setenv("COPSD_CPU_DYNAMIC", "0")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _, dx, dw = cpu.divergence(xs, ws, xt, wt, LOGIT, div, None, tg.to(acc))
        _check(dx, exact_div[1], plain_div[1], dtype, "divergence d_hidden")
        _check(dw, exact_div[2], plain_div[2], dtype, "divergence d_weight")
        _, ent, lse = cpu.logprobs_forward(xs, ws, ids, LOGIT)
        dx, dw = cpu.logprobs_backward(xs, ws, ids, lse, ent, *[g.to(acc) for g in gs], LOGIT)
        _check(dx, exact_lp[1], plain_lp[1], dtype, "log-prob backward d_hidden")
        _check(dw, exact_lp[2], plain_lp[2], dtype, "log-prob backward d_weight")
        _, _, dx, dw = cpu.logprobs_loss(xs, ws, ids, LOGIT, lambda r0, k, lp, e: (a[r0:r0 + k], b[r0:r0 + k]))
        _check(dx, exact_loss[1], plain_loss[1], dtype, "loss path d_hidden")
        _check(dw, exact_loss[2], plain_loss[2], dtype, "loss path d_weight")
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("chunks", list(CHUNKS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", MODES)
@pytest.mark.parametrize("grad", [True, False])
def test_divergence(mode, name, dtype, chunks, grad):
    n = CHUNKS[chunks]
    xs, ws, xt, wt, _ = _inputs(n, dtype, seed=3)
    div = DivergenceSpec(kind="reverse_kl")
    tg = torch.rand(n, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    exact = dense.divergence_grads(xs, ws, xt, wt, LOGIT, div, None, tg)
    plain = dense.divergence_grads(xs, ws, xt, wt, LOGIT, div, None, tg, dtype=torch.float32)
    mode(name, dtype, 2)
    loss, dx, dw = cpu.divergence(xs, ws, xt, wt, LOGIT, div, None,
                                  tg.to(torch.float64 if dtype == torch.float64 else torch.float32) if grad else None)
    _expect_path(name, dtype, chunks, 2)
    _check(loss, exact[0], plain[0], dtype, "loss", scale=5.0)
    if grad:
        _check(dx, exact[1], plain[1], dtype, "d_hidden")
        _check(dw, exact[2], plain[2], dtype, "d_weight")
    else:
        assert dx is None and dw is None


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@pytest.mark.parametrize("side", ["tiles", "whole", "0"])
@pytest.mark.parametrize("dtype,packed,bf16_gemm", [
    (torch.float32, True, "1"), (torch.bfloat16, True, "1"), (torch.float32, False, "1"), (torch.float64, False, "1"),
    (torch.bfloat16, False, "1"), (torch.bfloat16, False, "0")])
def test_divergence_side_by_side_logits(monkeypatch, threads, side, dtype, packed, bf16_gemm):
    """Both lm_heads packed, or unpacked (e.g. over the pack budget: read in place, or a bf16 head up-cast one block
    at a time into each thread's own scratch): a chunk's student and teacher logits GEMMs run side by side on the
    threads, each single-threaded, a side's rows split into threads / 2 parts of >= 128 rows (2 threads: one part;
    4 threads and 300-row chunks: two parts per side, the short last chunk of 57 rows falls back), handed out one
    (part, side, vocabulary tile) GEMM at a time ("tiles", the default: 2 tiles of 1536 and 517 entries), or one
    side's whole part per thread ("whole": COPSD_CPU_DYNAMIC=0, which also deals the gradient tiles in one fixed
    run per thread); or (COPSD_CPU_SIDE_GEMMS=0, one or three threads, or unpacked bf16 heads streamed through the
    bf16 kernel) one after the other, MKL splitting each; every kind, loss and gradients against float64, each
    chunk's logits counted once per side, the side-by-side chunks (and of those the tiled ones) counted apart."""
    if packed and not _packing():
        pytest.skip("no packed fp32 GEMM here (no AVX-512 and no MKL packed-GEMM API)")
    rows, n = 300, 657  # chunks of 300 + 300 + 57 rows
    bf16 = dtype == torch.bfloat16 and bf16_gemm != "0" and _C().bf16_gemm_available()  # on the bf16 kernel
    shared = packed or not bf16  # whether the heads' GEMMs may run on two threads at once
    side_chunks = 0 if side == "0" or not shared else {2: 3, 4: 2}.get(threads, 0)
    tile_chunks = side_chunks if side == "tiles" else 0
    xs, ws, xt, wt, _ = _inputs(n, dtype, seed=8)
    tg = torch.rand(n, generator=torch.Generator().manual_seed(18), dtype=torch.float64)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        elem = 8 if dtype == torch.float64 else 4
        monkeypatch.setattr(cpu, "WORKSPACE_BYTES", rows * 2 * V * elem)
        monkeypatch.delenv("COPSD_CPU_PACK", raising=False)
        monkeypatch.setenv("COPSD_CPU_BF16_GEMM", bf16_gemm)
        if packed:
            monkeypatch.delenv("COPSD_CPU_PACK_MB", raising=False)
        else:
            monkeypatch.setenv("COPSD_CPU_PACK_MB", "0")
        monkeypatch.setenv("COPSD_CPU_SIDE_GEMMS", "0" if side == "0" else "1")
        if side == "whole":
            monkeypatch.setenv("COPSD_CPU_DYNAMIC", "0")
        else:
            monkeypatch.delenv("COPSD_CPU_DYNAMIC", raising=False)
        for kind in ("reverse_kl", "forward_kl", "jsd"):
            div = DivergenceSpec(kind=kind, beta=0.3)
            exact = dense.divergence_grads(xs, ws, xt, wt, LOGIT, div, None, tg)
            plain = dense.divergence_grads(xs, ws, xt, wt, LOGIT, div, None, tg, dtype=torch.float32)
            _C().gemm_stats_reset()
            tgc = tg.to(torch.float64 if elem == 8 else torch.float32)
            loss, dx, dw = cpu.divergence(xs, ws, xt, wt, LOGIT, div, None, tgc)
            st = _C().gemm_stats()
            if packed:
                assert st["packs"] == 2 and st["packed_gemms"] == 6 and st["plain_gemms"] == 0, st
            else:
                assert st["packs"] == 0 and st["packed_gemms"] == 0 and st["plain_gemms"] == 6, st
            assert st["side_chunks"] == side_chunks, st
            assert st["side_tile_chunks"] == tile_chunks, st
            # On one thread team (csrc/cpu/team.h) where every chunk's logits are tile tasks (4 threads: not the
            # short last chunk's, so the call runs as separate regions).
            assert st["team_calls"] == (1 if tile_chunks == 3 else 0), st
            assert st["bf16_gemms"] == (6 if bf16 else 0), st
            for got, e, p, what in zip((loss, dx, dw), exact, plain, ("loss", "d_hidden", "d_weight")):
                _check(got, e, p, dtype, f"{kind} {what}", scale=5.0 if what == "loss" else 1.0)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("value,side", [(None, True), ("", True), ("1", True), ("on", True), ("Yes", True),
                                        ("0", False), ("false", False), ("OFF", False), ("no", False)])
def test_side_gemms_knob_spellings(monkeypatch, value, side):
    """COPSD_CPU_SIDE_GEMMS takes the spellings of every on/off knob: false / off / no turn the side-by-side
    logits GEMMs off as 0 does (they once meant on: only "0" was read as off), unset or empty is the default."""
    if not _packing():
        pytest.skip("no packed fp32 GEMM here (no AVX-512 and no MKL packed-GEMM API)")
    n = 300
    xs, ws, xt, wt, _ = _inputs(n, torch.float32, seed=9)
    tg = torch.ones(n)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(cpu, "WORKSPACE_BYTES", 150 * 2 * V * 4)  # two chunks of 150 rows
        for var in ("COPSD_CPU_PACK", "COPSD_CPU_PACK_MB", "COPSD_CPU_DYNAMIC"):
            monkeypatch.delenv(var, raising=False)
        if value is None:
            monkeypatch.delenv("COPSD_CPU_SIDE_GEMMS", raising=False)
        else:
            monkeypatch.setenv("COPSD_CPU_SIDE_GEMMS", value)
        _C().gemm_stats_reset()
        cpu.divergence(xs, ws, xt, wt, LOGIT, DivergenceSpec(), None, tg)
        assert _C().gemm_stats()["side_chunks"] == (2 if side else 0)
    finally:
        torch.set_num_threads(old)


def test_budget_for_one_lm_head(mode, monkeypatch):
    """A budget that holds one packed lm_head: the student's is packed, the teacher's runs unpacked, results
    as accurate as both packed.  The budget counts what a packed copy occupies (about the weight's own fp32
    size), not the larger size MKL reserves for it."""
    if not _packing():
        pytest.skip("no packed fp32 GEMM here (no AVX-512 and no MKL packed-GEMM API)")
    v = 13000  # a packed [v, H] fp32 copy of ~1.2 MiB: a whole-MiB budget holds one, not two
    xs, ws, xt, wt, _ = _inputs(CHUNKS[3], torch.float32, seed=4, v=v)
    div = DivergenceSpec(kind="jsd", beta=0.3)
    tg = torch.rand(CHUNKS[3], generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    exact = dense.divergence_grads(xs, ws, xt, wt, LOGIT, div, None, tg)
    plain = dense.divergence_grads(xs, ws, xt, wt, LOGIT, div, None, tg, dtype=torch.float32)
    mode("on", torch.float32, 2)
    monkeypatch.setattr(cpu, "WORKSPACE_BYTES", ROWS * 2 * v * 4)
    cpu.divergence(xs, ws, xt, wt, LOGIT, div, None, tg.float())
    both = _C().gemm_stats()
    assert both["packs"] == 2 and both["packed_gemms"] == 6, both
    weight_bytes = v * H * 4
    assert 2 * weight_bytes <= both["packed_bytes"] <= 2 * weight_bytes + 4 * 2**16, both
    assert both["packed_reserved"] >= both["packed_bytes"], both
    one_mib = math.ceil(both["packed_bytes"] / 2 / 2**20)
    assert one_mib * 2**20 < both["packed_bytes"], "the packed copy is below 1 MiB: pick a larger V for this test"
    monkeypatch.setenv("COPSD_CPU_PACK_MB", str(one_mib))
    _C().gemm_stats_reset()
    loss, dx, dw = cpu.divergence(xs, ws, xt, wt, LOGIT, div, None, tg.float())
    st = _C().gemm_stats()
    assert st["packs"] == 1 and st["packed_gemms"] == 3 and st["plain_gemms"] == 3, st
    for got, e, p, what in zip((loss, dx, dw), exact, plain, ("loss", "d_hidden", "d_weight")):
        _check(got, e, p, torch.float32, what, scale=5.0 if what == "loss" else 1.0)


@pytest.mark.parametrize("kernel,copy,budget_mib,packs", [
    ("fp32", "", 3, 2), ("fp32", "", 2, 1), ("fp32", "1", 4, 2), ("fp32", "1", 3, 1), ("bf16", "", 3, 2),
    ("bf16", "", 2, 1)])
def test_budget_bf16_student_with_grads(mode, monkeypatch, kernel, copy, budget_mib, packs):
    """A bf16 divergence with gradients.  On the fp32 GEMMs (COPSD_CPU_BF16_GEMM=0) each lm_head takes its packed
    copy, counted at about the weight's fp32 size (~1.2 MiB here; the student's d_hidden products up-cast its rows
    per tile), so a 3 MiB budget packs both lm_heads and a 2 MiB one only the student's; with
    COPSD_CPU_UPCAST_COPY=1 the student also keeps one whole fp32 copy (3 x ~1.2 MiB): 4 MiB packs both, 3 MiB
    only the student's.  On the bf16 GEMM the packed copies are bf16 (~0.6 MiB each, beside the student's
    ~1.2 MiB fp32 copy): 3 MiB packs both, 2 MiB only the student's, and the teacher's GEMMs stream its weight
    through the kernel.  Results as accurate either way."""
    if kernel == "fp32" and not _packing():
        pytest.skip("no packed fp32 GEMM here (no AVX-512 and no MKL packed-GEMM API)")
    if kernel == "bf16" and not _C().bf16_gemm_available():
        pytest.skip("this CPU (or COPSD_CPU_ISA) has no AVX512_BF16: no bf16 logits GEMM")
    v = 13000
    xs, ws, xt, wt, _ = _inputs(CHUNKS[2], torch.bfloat16, seed=6, v=v)
    div = DivergenceSpec(kind="reverse_kl")
    tg = torch.rand(CHUNKS[2], generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    exact = dense.divergence_grads(xs, ws, xt, wt, LOGIT, div, None, tg)
    plain = dense.divergence_grads(xs, ws, xt, wt, LOGIT, div, None, tg, dtype=torch.float32)
    mode("on", torch.bfloat16, 2)
    monkeypatch.setattr(cpu, "WORKSPACE_BYTES", ROWS * 2 * v * 4)
    monkeypatch.setenv("COPSD_CPU_PACK_MB", str(budget_mib))
    if kernel == "fp32":
        monkeypatch.setenv("COPSD_CPU_BF16_GEMM", "0")
    monkeypatch.setenv("COPSD_CPU_UPCAST_COPY", copy)
    loss, dx, dw = cpu.divergence(xs, ws, xt, wt, LOGIT, div, None, tg.float())
    st = _C().gemm_stats()
    assert st["packs"] == packs and st["packed_gemms"] == 2 * packs and st["plain_gemms"] == 2 * (2 - packs), st
    assert st["bf16_gemms"] == (4 if kernel == "bf16" else 0), st
    for got, e, p, what in zip((loss, dx, dw), exact, plain, ("loss", "d_hidden", "d_weight")):
        _check(got, e, p, torch.bfloat16, what, scale=5.0 if what == "loss" else 1.0)


@pytest.mark.parametrize("threads", [1, 2])
def test_ops_layer_transposed_and_strided_inputs(mode, threads):
    """Through the public op with autograd: a transposed-view lm_head (tied-embedding style [H, V] storage) and
    strided hidden states, packed vs not packed, 1 and 2 threads; both against float64."""
    from copsd import ops
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = CHUNKS[3]
        g = torch.Generator().manual_seed(5)
        w_store = torch.randn(H, V, generator=g) / H**0.5 * 2  # the lm_head is its transpose
        x_store = torch.randn(n, 2 * H, generator=g)
        ids = torch.randint(0, V, (n,), generator=g)
        x64 = x_store[:, ::2].double().requires_grad_()
        w64 = w_store.t().double().requires_grad_()
        lp64, ent64, _ = dense.logprobs(x64, w64, ids)
        (lp64.sum() + 0.1 * ent64.sum()).backward()
        results = {}
        for name in ("on", "off"):
            mode(name, torch.float32, 1)
            x_leaf = x_store.clone().requires_grad_()
            w_leaf = w_store.clone().requires_grad_()
            x, w = x_leaf[:, ::2], w_leaf.t()
            assert not w.is_contiguous() and not x.is_contiguous()
            lp, ent, _ = ops.linear_logprobs(x, w, ids, return_entropy=True, backend="cpu")
            (lp.sum() + 0.1 * ent.sum()).backward()
            results[name] = (lp.detach(), x_leaf.grad[:, ::2], w_leaf.grad.t())
            assert x_leaf.grad[:, 1::2].abs().max() == 0
        for name, (lp, dx, dw) in results.items():
            for got, want, what in ((lp, lp64, "logprobs"), (dx, x64.grad, "d_hidden"), (dw, w64.grad, "d_weight")):
                err = criteria.max_error(got, want)
                assert err <= 1e-4 * (1 + want.abs().max().item()), f"{name} {what}: {err:.3g}"
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("var,value", [("COPSD_CPU_PACK", "maybe"), ("COPSD_CPU_PACK_MB", "-1"),
                                       ("COPSD_CPU_PACK_MB", "lots"), ("COPSD_CPU_TOPK_TILE", "-5"),
                                       ("COPSD_CPU_TOPK_TILE", "wide"), ("COPSD_CPU_DYNAMIC", "sometimes"),
                                       ("COPSD_CPU_F32_GEMM", "fast"), ("COPSD_CPU_SIDE_GEMMS", "2"),
                                       ("COPSD_CPU_GRAD_TILES", "sometimes")])
def test_bad_knob_values_are_errors(mode, monkeypatch, var, value):
    x, w, xt, wt, ids = _inputs(CHUNKS[2], torch.float32)
    mode("on", torch.float32, 1)
    monkeypatch.setenv(var, value)
    old = torch.get_num_threads()
    torch.set_num_threads(2)  # the side-by-side GEMMs' knob is read where two threads could run them
    try:
        with pytest.raises(RuntimeError, match=var):
            if var == "COPSD_CPU_TOPK_TILE":
                cpu.topk(x, w, 3, LOGIT)
            elif var in ("COPSD_CPU_DYNAMIC", "COPSD_CPU_SIDE_GEMMS", "COPSD_CPU_GRAD_TILES"):
                cpu.divergence(x, w, xt, wt, LOGIT, DivergenceSpec(), None, torch.ones(CHUNKS[2]))
            else:
                cpu.logprobs_forward(x, w, ids, LOGIT)
    finally:
        torch.set_num_threads(old)


MIB = 1 << 20


def test_default_workspace_grows_for_a_large_vocabulary():
    """COPSD_CPU_WORKSPACE_MB unset (budget 0): 64 MiB, or what 256 rows (128 without gradient GEMMs; N if fewer)
    per side need when that is more, up to 512 MiB.  A set budget is used as given."""
    wb = _C().workspace_budget
    assert wb(64 * MIB, 4096, 151936, 4, 2, True) == 64 * MIB  # set: as given, even where it holds few rows
    assert wb(3 * MIB, 4096, 32000, 4, 2, True) == 3 * MIB
    assert wb(0, 4096, 32000, 4, 2, True) == 64 * MIB  # 256 rows x 2 sides fit 64 MiB at V = 32000
    assert wb(0, 4096, 151936, 4, 2, True) == 2 * 256 * 151936 * 4  # a real vocabulary: 256 rows per side
    assert wb(0, 4096, 151936, 4, 1, True) == 256 * 151936 * 4
    assert wb(0, 4096, 151936, 4, 2, False) == 2 * 128 * 151936 * 4
    assert wb(0, 4096, 50000, 8, 2, True) == 2 * 256 * 50000 * 8  # fp64 logits
    assert wb(0, 100, 151936, 4, 2, True) == max(64 * MIB, 2 * 100 * 151936 * 4)  # one chunk of all 100 tokens
    assert wb(0, 10, 151936, 4, 2, True) == 64 * MIB
    assert wb(0, 4096, 10**6, 4, 2, True) == 512 * MIB  # capped
    for v in (32000, 151936, 262144):  # the rows the default holds: 256 per side wherever it is not capped
        assert _C().chunk_rows(4096, v, 4, 2, wb(0, 4096, v, 4, 2, True), True) == 256
    assert _C().chunk_rows(4096, 151936, 4, 2, 64 * MIB, True) == 55  # what 64 MiB held at that vocabulary


def test_gradient_tile_runs():
    """The gradient GEMMs hand out runs of vocabulary tiles, one d_hidden partial per run: one run per tile where
    their [rows, H] partials fit 16 MiB, else as many as fit, but never fewer than the threads nor more than the
    tiles."""
    runs = _C().grad_runs
    assert runs(16, 2, 256, 512, 4) == 16  # V = 32000, H = 512: 16 tiles, 16 x 512 KiB of partials
    assert runs(38, 2, 256, 896, 4) == 18  # V = 151936, H = 896: 38 tiles of 4096, 18 partials of 896 KiB fit
    assert runs(38, 2, 256, 4096, 4) == 4  # 4 MiB partials: 4 fit
    assert runs(38, 16, 256, 4096, 4) == 16  # one per thread at least
    assert runs(3, 16, 256, 4096, 4) == 3  # never more than the tiles
    assert runs(38, 2, 256, 32768, 8) == 2  # a partial over the whole 16 MiB: one per thread
    assert runs(1, 1, 1, 1, 4) == 1


def test_workspace_env_knob(monkeypatch):
    monkeypatch.delenv("COPSD_CPU_WORKSPACE_MB", raising=False)
    assert cpu._workspace_bytes() == 0
    monkeypatch.setenv("COPSD_CPU_WORKSPACE_MB", "")
    assert cpu._workspace_bytes() == 0
    monkeypatch.setenv("COPSD_CPU_WORKSPACE_MB", "64")
    assert cpu._workspace_bytes() == 64 * MIB
    for bad in ("0", "-3", "lots", "1.5"):
        monkeypatch.setenv("COPSD_CPU_WORKSPACE_MB", bad)
        with pytest.raises(ValueError, match="COPSD_CPU_WORKSPACE_MB"):
            cpu._workspace_bytes()


def test_default_workspace_in_the_ops(monkeypatch):
    """The ops size the default workspace per call: at V = 40000 (past the 32768 that 64 MiB holds 256 fp32 rows
    of, per side) a 512-token divergence runs 2 chunks of 256 rows by default, where a set 64 MiB runs 3 of 209;
    both agree with float64."""
    n, v = 512, 40000
    xs, ws, xt, wt, _ = _inputs(n, torch.float64, seed=3, v=v)
    tg = torch.rand(n, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.5
    div = DivergenceSpec(kind="reverse_kl")
    exact = cpu.divergence(xs, ws, xt, wt, LOGIT, div, token_grad=tg)
    f32 = [t.float() for t in (xs, ws, xt, wt)]
    monkeypatch.delenv("COPSD_CPU_PACK", raising=False)
    monkeypatch.delenv("COPSD_CPU_PACK_MB", raising=False)
    for budget, chunks in ((0, 2), (64 * MIB, 3)):
        monkeypatch.setattr(cpu, "WORKSPACE_BYTES", budget)
        _C().gemm_stats_reset()
        got = cpu.divergence(*f32, LOGIT, div, token_grad=tg.float())
        st = _C().gemm_stats()
        assert st["packed_gemms"] + st["plain_gemms"] == 2 * chunks, (budget, st)
        for g, e, what in zip(got, exact, ("loss", "d_hidden", "d_weight")):
            err = criteria.max_error(g, e)
            assert err <= 1e-4 * (1 + e.abs().max().item()), f"budget {budget} {what}: {err:.3g}"
