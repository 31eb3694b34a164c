"""The C++ CPU backend's buffer cache (``COPSD_CPU_CACHE_MB``, ``csrc/cpu/buffers.h``): large buffers kept between
calls are found again by a call of the same shapes, a reused buffer's stale contents never reach a result, a
buffer a caller still holds (a returned gradient) is never handed out again, the bound holds, and a call of other
shapes frees the kept buffers before it allocates its own."""

import pytest
import torch

from copsd.backends import cpu
from copsd.ops._spec import DivergenceSpec, LogitSpec

pytestmark = pytest.mark.skipif(not cpu.available(), reason="copsd._C (C++ CPU extension) is not built")

# Large enough that the workspaces, packed tiles, up-cast copies and d_weight (V x H x 4 = 3 MiB) are >= 1 MiB,
# the size from which buffers are cached; 300 tokens make two chunks, the second partial.
N, H, V, K = 300, 64, 12000, 16
OPS = ["divergence", "divergence_bf16", "logprobs", "logprobs_loss", "topk"]


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.delenv("COPSD_CPU_CACHE_MB", raising=False)
    cpu.empty_cache()
    yield
    cpu.empty_cache()


def _inputs(seed, v=V, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    xs, xt = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)
    ws, wt = torch.randn(v, H, generator=g) / H**0.5 * 3, torch.randn(v, H, generator=g) / H**0.5 * 3
    ids = torch.randint(0, v, (N,), generator=g)
    gs = [torch.randn(N, generator=g) for _ in range(3)]
    return [t.to(dtype) for t in (xs, ws, xt, wt)] + [ids, gs]


def _call(op, seed, v=V):
    """One call of `op`; its outputs cloned, so no output keeps a cached block."""
    dtype = torch.bfloat16 if op.endswith("bf16") else torch.float32
    xs, ws, xt, wt, ids, gs = _inputs(seed, v, dtype)
    if op.startswith("divergence"):
        out = cpu.divergence(xs, ws, xt, wt, LogitSpec(), DivergenceSpec(kind="jsd", beta=0.5), None, gs[0])
    elif op == "logprobs":
        lp, ent, lse = cpu.logprobs_forward(xs, ws, ids, LogitSpec())
        out = [lp, ent, lse, *cpu.logprobs_backward(xs, ws, ids, lse, ent, *gs, LogitSpec())]
    elif op == "logprobs_loss":
        out = cpu.logprobs_loss(xs, ws, ids, LogitSpec(), lambda r0, n, a, b: (gs[0][r0:r0 + n], gs[1][r0:r0 + n]))
    else:
        out = cpu.topk(xs, ws, K, LogitSpec())
    return [t.clone() for t in out]


@pytest.mark.parametrize("op", OPS)
def test_a_call_of_the_same_shapes_reuses_the_buffers_and_gets_the_same_results(op, monkeypatch):
    """With the cache off: the reference.  With it on: a call on other inputs of the same shapes leaves its
    buffers (full of its own values); the next call takes every large buffer from the cache (no miss) and its
    results are bit-equal to the reference: no stale value is read."""
    monkeypatch.setenv("COPSD_CPU_CACHE_MB", "0")
    want = _call(op, seed=1)
    assert cpu.cache_stats()["held_bytes"] == 0
    monkeypatch.delenv("COPSD_CPU_CACHE_MB")
    _call(op, seed=0)
    assert cpu.cache_stats()["held_bytes"] > 0
    cpu._C.cache_stats_reset()
    got = _call(op, seed=1)
    stats = cpu.cache_stats()
    assert stats["misses"] == 0 and stats["hits"] > 0, stats
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), (op, i)
    assert stats["in_use_bytes"] == 0, stats  # every block came back once its tensor was freed


def test_a_gradient_the_caller_keeps_is_never_handed_out_again():
    xs, ws, xt, wt, _, gs = _inputs(0)
    first = cpu.divergence(xs, ws, xt, wt, LogitSpec(), DivergenceSpec(), None, gs[0])
    kept = [t.clone() for t in first]
    xs2, ws2, xt2, wt2, _, gs2 = _inputs(1)
    second = cpu.divergence(xs2, ws2, xt2, wt2, LogitSpec(), DivergenceSpec(), None, gs2[0])
    assert first[2].data_ptr() != second[2].data_ptr() and first[1].data_ptr() != second[1].data_ptr()
    for a, b in zip(first, kept):
        assert torch.equal(a, b)
    assert cpu.cache_stats()["in_use_bytes"] > 0  # the gradients of both calls are alive
    del first, second, a, b
    assert cpu.cache_stats()["in_use_bytes"] == 0


def test_the_bound_holds(monkeypatch):
    _call("divergence", 0)
    held = cpu.cache_stats()["held_bytes"]
    assert 0 < held <= 256 << 20
    cpu.empty_cache()
    assert cpu.cache_stats()["held_bytes"] == 0 and cpu.cache_stats()["held_blocks"] == 0
    monkeypatch.setenv("COPSD_CPU_CACHE_MB", "4")
    _call("divergence", 0)
    assert 0 < cpu.cache_stats()["held_bytes"] <= 4 << 20
    cpu.empty_cache()
    monkeypatch.setenv("COPSD_CPU_CACHE_MB", "8")
    xs, ws, xt, wt, _, gs = _inputs(0)
    out = cpu.divergence(xs, ws, xt, wt, LogitSpec(), DivergenceSpec(), None, gs[0])  # d_weight stays in use
    stats = cpu.cache_stats()
    assert stats["in_use_bytes"] >= V * H * 4 and stats["held_bytes"] + stats["in_use_bytes"] <= 8 << 20, stats
    del out
    monkeypatch.setenv("COPSD_CPU_CACHE_MB", "0")
    _call("divergence", 0)
    assert cpu.cache_stats()["held_bytes"] == 0
    monkeypatch.setenv("COPSD_CPU_CACHE_MB", "lots")
    with pytest.raises(RuntimeError, match="COPSD_CPU_CACHE_MB must be a non-negative integer"):
        _call("divergence", 0)


def test_the_least_recently_kept_buffers_go_first(monkeypatch):
    """Alternating ops keep both sets within the bound (the second op's call finds its buffers); under a bound that
    holds one set, a call of other shapes ends up keeping exactly what it would keep alone."""
    _call("divergence", 0)
    alone = cpu.cache_stats()["held_bytes"]
    _call("topk", 0)
    cpu._C.cache_stats_reset()
    _call("divergence", 1)
    _call("topk", 1)
    assert cpu.cache_stats()["misses"] == 0
    cpu.empty_cache()
    _call("divergence", 0, v=2 * V)
    assert cpu.cache_stats()["held_bytes"] > alone
    monkeypatch.setenv("COPSD_CPU_CACHE_MB", str(-(-alone // (1 << 20)) + 1))
    _call("divergence", 0)
    assert cpu.cache_stats()["held_bytes"] == alone


def test_gradients_from_the_cache_accumulate_like_any_other(monkeypatch):
    """Through the public op and autograd: the lm_head's .grad is a cached block; a second backward adds into it in
    place, zero_grad(set_to_none) hands it back, and every step matches the cache off bit for bit."""
    from copsd.ops import linear_divergence

    def steps():
        xs, ws, xt, wt, _, _ = _inputs(0)
        xs.requires_grad_()
        ws.requires_grad_()
        grads = []
        for _ in range(2):
            for _ in range(2):  # two micro-batches accumulate
                linear_divergence(xs, ws, xt, wt, kind="jsd", reduction="sum", backend="cpu").backward()
            grads.append((xs.grad.clone(), ws.grad.clone()))
            xs.grad = ws.grad = None
        return grads

    monkeypatch.setenv("COPSD_CPU_CACHE_MB", "0")
    want = steps()
    monkeypatch.delenv("COPSD_CPU_CACHE_MB")
    got = steps()
    assert cpu.cache_stats()["hits"] > 0
    for (gx, gw), (wx, ww) in zip(got, want):
        assert torch.equal(gx, wx) and torch.equal(gw, ww)
