"""``linear_logprobs_loss``: a per-token loss of the log-probs / entropies with its gradient in the forward pass,
against the dense float64 formulas (tests/dense.py) through autograd, on every backend that runs here: the
reference backend, the C++ CPU backend (several token chunks) and the Triton backend in the interpreter (both
GPU paths; the ``chunked`` one keeps each chunk's logits between the statistics and the gradient).

float64 runs are held to 1e-10; float32 runs to the error-relative criterion of ``tests/criteria.py`` (error vs
float64 at most a few times that of the same loss written in plain dense fp32 PyTorch)."""

import pytest
import torch
from criteria import assert_accurate

from copsd import reference as dense
from copsd.backends import cpu
from copsd.ops import linear_logprobs_loss

SPECS = {
    "plain": dict(),
    "all": dict(temperature=0.7, logit_scale=1.3, softcap=3.0),
}


def _backends():
    out = [("reference", None)]
    if cpu.available():
        out.append(("cpu", None))
    try:
        import triton  # noqa: F401

        out += [("triton", "fused"), ("triton", "chunked")]
    except ImportError:
        pass
    return out


@pytest.fixture(params=_backends(), ids=lambda p: p[0] + (f"-{p[1]}" if p[1] else ""))
def backend(request, monkeypatch):
    name, path = request.param
    if name == "cpu":
        monkeypatch.setattr(cpu, "WORKSPACE_BYTES", 3 * 61 * 8)  # ~3 rows per chunk
    if name == "triton":
        if not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        from copsd.backends import _triton_common as tc

        monkeypatch.setenv("COPSD_TRITON_PATH", path)
        monkeypatch.setattr(tc, "CHUNK_BYTES", 1)  # one token per chunk on the chunked path
    return name


def _ppo_like(adv, old, weight_ent):
    """A PPO-style per-token loss: nonlinear in the log-prob, linear in the entropy."""
    def fn(lp, ent, rows):
        ratio = torch.exp(lp - old[rows])
        pg = -torch.minimum(ratio * adv[rows], ratio.clamp(0.8, 1.2) * adv[rows])
        return pg - weight_ent * ent
    return fn


def _dense_loss(x, w, ids, fn, spec):
    lp, ent, _ = dense.logprobs(x, w, ids, **spec)
    return fn(lp, ent, slice(0, x.shape[0])).sum(), lp, ent


def _check(got, exact, plain, names, dtype, scales=None):
    """``scales[name]``: the size of that quantity's intermediates where they exceed it (see criteria.py)."""
    for g, e, p, name in zip(got, exact, plain, names):
        g, e = g.detach().double(), e.detach().double()
        if dtype == torch.float64:
            err = (g - e).abs().max().item()
            assert err <= 1e-10 * (1 + e.abs().max().item()), (name, err, tuple(g.shape))
        else:
            assert_accurate(g, e, p, name, scale=(scales or {}).get(name, 1.0))


NAMES = ("loss", "logprobs", "entropy", "d_hidden", "d_weight")


@pytest.mark.isa
@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("N,H,V", [(13, 24, 61), (1, 8, 1), (7, 16, 5)])
@pytest.mark.parametrize("use", ["lp", "ent", "both"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_dense(backend, spec, N, H, V, use, dtype):
    g = torch.Generator().manual_seed(N * 100 + V)
    x = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * (2.0 / H**0.5)
    ids = torch.randint(0, V, (N,), generator=g)
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    old = torch.randn(N, generator=g, dtype=torch.float64) * 0.1 - 1.0
    base = _ppo_like(adv, old, 0.3)
    fn = {"lp": lambda lp, ent, rows: base(lp, ent.detach(), rows) + 0.3 * ent.detach(),
          "ent": lambda lp, ent, rows: -0.3 * ent + 0.0 * lp.detach(),
          "both": base}[use]
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton backend serves fp32/bf16")
    if backend == "reference" and dtype == torch.float32:
        pytest.skip("the reference backend in fp32 is the plain computation itself")
    xb = x.to(dtype).clone().requires_grad_(True)
    wb = w.to(dtype).clone().requires_grad_(True)
    calls = []

    def recording(lp, ent, rows):
        calls.append((rows.start, rows.stop))
        return fn(lp.double(), ent.double(), rows).to(lp.dtype)

    loss, lp, ent = linear_logprobs_loss(xb, wb, ids, recording, backend=backend, **SPECS[spec])
    assert not lp.requires_grad and not ent.requires_grad
    # the chunks cover the tokens once, in order
    assert calls[0][0] == 0 and calls[-1][1] == N
    assert all(a[1] == b[0] for a, b in zip(calls, calls[1:]))
    # an upstream gradient that is not 1 (the stored gradient is scaled in backward)
    dx, dw = torch.autograd.grad(loss * 2.5, (xb, wb))
    res = {}
    for name, dt in (("exact", torch.float64), ("plain", torch.float32)):
        xd, wd = x.to(dt).clone().requires_grad_(True), w.to(dt).clone().requires_grad_(True)
        f = fn if dt == torch.float64 else (lambda lp, ent, rows: fn(lp.double(), ent.double(), rows).float())
        ref, lp_d, ent_d = _dense_loss(xd, wd, ids, f, SPECS[spec])
        res[name] = (ref, lp_d, ent_d, *torch.autograd.grad(ref * 2.5, (xd, wd)))
    # With V = 1 the exact gradient is 0 and plain autograd gets exactly 0, while the op's 1 - p rounds to a few
    # ulps of one summand (|x| |w| x the upstream factor 2.5).
    g = 2.5 * x.abs().max().item() * w.abs().max().item()
    _check((loss, lp, ent, dx, dw), res["exact"], res["plain"], NAMES, dtype, {"d_hidden": g, "d_weight": g})


@pytest.mark.isa
def test_extreme_logits_and_one_hot(backend):
    g = torch.Generator().manual_seed(3)
    N, H, V = 9, 8, 37
    x = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 1e3  # logits of order 1e4
    ids = torch.randint(0, V, (N,), generator=g)
    dtype = torch.float32 if backend in ("triton", "cpu") else torch.float64

    def fn(lp, ent, rows):
        return -lp + 0.1 * ent

    res = {}
    # the op on the rounded inputs, their float64 truth, and plain PyTorch in the op's precision
    for name, dt in (("op", dtype), ("exact", torch.float64), ("plain", dtype)):
        xd, wd = x.to(dtype).to(dt).clone().requires_grad_(True), w.to(dtype).to(dt).clone().requires_grad_(True)
        if name == "op":
            ref = linear_logprobs_loss(xd, wd, ids, fn, backend=backend)[0]
        else:
            ref = _dense_loss(xd, wd, ids, fn, {})[0]
        res[name] = (ref.detach(), *torch.autograd.grad(ref, (xd, wd)))
    loss, dx, dw = res["op"]
    assert torch.isfinite(loss) and torch.isfinite(dx).all() and torch.isfinite(dw).all()
    # An fp32 log-prob at logits of size |z| ~ 1e4 is known to one rounding of z - lse, eps |z| ~ 1e-3, and so
    # are the gradients' coefficients: the floor is in ulps of |z| (x |w| or |x| for the gradients).  Plain
    # PyTorch can be luckier (z_max - lse cancels exactly), which says nothing about the op.
    z = (x @ w.T).abs().max().item()
    scales = {"loss": N * z, "d_hidden": z * w.abs().max().item(), "d_weight": z * x.abs().max().item()}
    _check(res["op"], res["exact"], res["plain"], ("loss", "d_hidden", "d_weight"), dtype, scales)


def test_constant_loss_and_no_tokens(backend):
    x = torch.randn(5, 8, dtype=torch.float32, requires_grad=True)
    w = torch.randn(11, 8, dtype=torch.float32, requires_grad=True)
    ids = torch.randint(0, 11, (5,))
    loss, _, _ = linear_logprobs_loss(x, w, ids, lambda lp, ent, rows: torch.ones_like(lp), backend=backend)
    dx, dw = torch.autograd.grad(loss, (x, w))
    assert float(loss) == 5.0 and (dx == 0).all() and (dw == 0).all()
    e = torch.zeros(0, 8, requires_grad=True)
    loss, lp, _ = linear_logprobs_loss(e, w, ids[:0], lambda lp, ent, rows: -lp, backend=backend)
    dx, dw = torch.autograd.grad(loss, (e, w))
    assert float(loss) == 0.0 and lp.shape == (0,) and dx.shape == (0, 8) and (dw == 0).all()


def test_without_gradients_only_the_loss(backend):
    x = torch.randn(6, 8, dtype=torch.float32)
    w = torch.randn(13, 8, dtype=torch.float32)
    ids = torch.randint(0, 13, (6,))
    fn = lambda lp, ent, rows: -lp * 2.0 + ent  # noqa: E731
    loss, lp, ent = linear_logprobs_loss(x, w, ids, fn, backend=backend)
    lp_d, ent_d, _ = dense.logprobs(x.double(), w.double(), ids)
    lp_p, ent_p, _ = dense.logprobs(x, w, ids)
    assert not loss.requires_grad
    assert_accurate(loss, fn(lp_d, ent_d, None).sum(), fn(lp_p, ent_p, None).sum(), "loss")
    with torch.no_grad():
        loss2, _, _ = linear_logprobs_loss(x.requires_grad_(True), w, ids, fn, backend=backend)
    assert not loss2.requires_grad and float(loss2) == float(loss)


def test_bad_loss_fn_is_reported(backend):
    """Also through the C++ driver and the Triton paths, which call loss_fn from inside their chunk loops."""
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    ids = torch.randint(0, 11, (4,))
    with pytest.raises(ValueError, match="loss_fn: expected a callable"):
        linear_logprobs_loss(x, w, ids, "mean", backend=backend)
    wrong = r"loss_fn: expected a floating \[\d+\] tensor of per-token losses for rows \[0, "  # chunk sizes differ
    with pytest.raises(ValueError, match=wrong):
        linear_logprobs_loss(x, w, ids, lambda lp, ent, rows: lp.sum(), backend=backend)
    with pytest.raises(ValueError, match=wrong):
        linear_logprobs_loss(x, w, ids, lambda lp, ent, rows: 0.0, backend=backend)
    scale = torch.ones((), requires_grad=True)  # a trainable side input: its gradient would be lost
    with pytest.raises(ValueError, match="requires grad other than the log-probs"):
        linear_logprobs_loss(x, w, ids, lambda lp, ent, rows: scale * lp, backend=backend)
    with pytest.raises(ValueError, match="ids"):
        linear_logprobs_loss(x, w, ids + 11, lambda lp, ent, rows: lp, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["fused", "chunked"])
def test_gpu_bf16_flash_criterion(path, monkeypatch):
    """bf16 on a GPU: the op's error against float64 at most 2x that of plain bf16 PyTorch autograd."""
    from copsd.backends import _triton_common as tc

    monkeypatch.setenv("COPSD_TRITON_PATH", path)
    monkeypatch.setattr(tc, "CHUNK_BYTES", 64 * 5003 * 6)  # several token chunks (dW accumulated)
    g = torch.Generator().manual_seed(7)
    N, H, V = 300, 512, 5003
    x = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * (3.0 / H**0.5)
    ids = torch.randint(0, V, (N,), generator=g)
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    old = torch.randn(N, generator=g, dtype=torch.float64) * 0.1 - 2.0
    fn = _ppo_like(adv.cuda(), old.cuda(), 0.01)
    errs = {}
    for name in ("copsd", "torch"):
        xb = x.to("cuda", torch.bfloat16).requires_grad_(True)
        wb = w.to("cuda", torch.bfloat16).requires_grad_(True)
        if name == "copsd":
            loss, _, _ = linear_logprobs_loss(xb, wb, ids.cuda(), fn, backend="triton")
        else:
            ls = (xb @ wb.T).float().log_softmax(-1).to(torch.bfloat16)
            lp = ls.gather(1, ids.cuda()[:, None])[:, 0]
            ent = -(ls.exp() * ls).sum(-1)
            loss = fn(lp.float(), ent.float(), slice(0, N)).sum()
        dx, dw = torch.autograd.grad(loss, (xb, wb))
        errs[name] = (loss.double().cpu(), dx.double().cpu(), dw.double().cpu())
    xd, wd = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    fn64 = _ppo_like(adv, old, 0.01)
    ref, _, _ = _dense_loss(xd, wd, ids, fn64, {})
    exact = (ref.detach(),) + torch.autograd.grad(ref, (xd, wd))
    for i, e in enumerate(exact):
        k_err = (errs["copsd"][i] - e).abs().max().item()
        t_err = (errs["torch"][i] - e).abs().max().item()
        assert k_err <= 2 * t_err + 1e-6, (i, k_err, t_err)
