"""The public ops as ``torch.library`` custom ops: ``torch.compile(fullgraph=True)`` over a function calling each
op compiles (no graph break) and matches eager, values and gradients, on the reference and C++ CPU backends;
``torch.library.opcheck`` passes for every registered op (schema, fake implementation, autograd registration,
AOT dispatch with dynamic shapes).  Tiny shapes: this is about the op plumbing, not the math (the per-op test
files).  The attention ops have no C++ CPU kernels: on CPU tensors they run on the reference backend, with
PyTorch's CPU flash kernel (``reference``) or the chunked torch path (``reference-chunked``).

The compiled functions use the ``aot_eager`` backend: Dynamo + AOTAutograd (fake tensors, the joint forward /
backward graph through the registered autograd) without Inductor's C++ code generation, which would only
compile the few torch ops around the custom ops and takes minutes on a small CI machine.
"""

import pytest
import torch

from copsd.ops import (
    available_backends,
    linear_divergence,
    linear_logprobs,
    linear_logprobs_loss,
    linear_topk,
    merge_attention_states,
    shared_prefix_attention,
)

OPS = torch.ops.copsd

BACKENDS = [b for b in ("reference", "cpu") if b in available_backends()]
F64 = torch.float64


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _lm(N=9, H=6, V=13, dtype=F64, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g, dtype=dtype)
    w = torch.randn(V, H, generator=g, dtype=dtype)
    return x.requires_grad_(grad), w.requires_grad_(grad)


def _compiled(fn):
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def _eager_and_compiled(fn, inputs, wrt):
    out = []
    for f in (fn, _compiled(fn)):
        y = f(*inputs)
        grads = torch.autograd.grad(y, wrt) if wrt else ()
        out.append((y.detach(), grads))
    return out


def _same(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _compiled_matches_eager(fn, inputs, wrt):
    """``fn`` compiled (fullgraph) gives eager's value and gradients w.r.t. ``wrt``; returns eager's gradients."""
    (ye, ge), (yc, gc) = _eager_and_compiled(fn, inputs, wrt)
    _same(yc, ye)
    assert len(gc) == len(ge)
    for a, b in zip(gc, ge):
        _same(a, b)
    return ge


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_compiles(backend):
    x, w = _lm()
    ids = torch.randint(0, 13, (9,))

    def f(x, w, ids):
        lp, ent, lse = linear_logprobs(x, w, ids, temperature=0.7, softcap=3.0, return_entropy=True,
                                       backend=backend)
        return (lp * torch.linspace(-1, 1, 9, dtype=F64)).sum() + 0.3 * ent.sum() - 0.1 * lse.sum()

    ge = _compiled_matches_eager(f, (x, w, ids), (x, w))
    assert ge[0].abs().sum() > 0 and ge[1].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_one_output_used_compiles(backend):
    """Unused outputs get no gradient (None, not zeros): the backward op takes optional gradients."""
    x, w = _lm()
    ids = torch.randint(0, 13, (9,))

    def f(x, w, ids):
        return linear_logprobs(x, w, ids, backend=backend)[0].sum()

    _compiled_matches_eager(f, (x, w, ids), (x, w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_loss_compiles(backend):
    """Not a custom op (its loss_fn is a Python callable): under torch.compile it runs as linear_logprobs + the
    loss over all rows, which must give the eager (fused, chunked) loss and gradients."""
    x, w = _lm()
    ids = torch.randint(0, 13, (9,))
    adv = torch.linspace(-1, 1, 9, dtype=F64)

    def loss_fn(lp, ent, rows):
        ratio = torch.exp(lp - lp.detach())
        return -ratio * adv[rows] - 0.01 * ent

    def f(x, w, ids):
        loss, lp, ent = linear_logprobs_loss(x, w, ids, loss_fn, logit_scale=1.3, backend=backend)
        return loss + 0 * lp.sum() + 0 * ent.sum()

    _compiled_matches_eager(f, (x, w, ids), (x, w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_topk_compiles(backend):
    x, w = _lm(grad=False)

    def f(x, w):
        ids, lp, lse = linear_topk(x, w, 4, temperature=1.5, backend=backend)
        return ids, lp, lse

    for a, b in zip(f(x, w), _compiled(f)(x, w)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("support", ["full", "teacher_topk"])
def test_linear_divergence_compiles(backend, reduction, support):
    xs, ws = _lm(seed=1)
    xt, wt = _lm(grad=False, seed=2)
    mask = torch.tensor([True, False, True, True, True, False, True, True, True])
    up = torch.linspace(0.5, 2, 9, dtype=F64)
    extra = dict(support=support, topk=3, tail="bucket") if support == "teacher_topk" else {}

    def f(xs, ws, xt, wt, mask):
        loss = linear_divergence(xs, ws, xt, wt, kind="jsd", beta=0.3, temperature=0.9, mask=mask,
                                 reduction=reduction, backend=backend, **extra)
        return (loss * up).sum() if reduction == "none" else loss * 1.7

    ge = _compiled_matches_eager(f, (xs, ws, xt, wt, mask), (xs, ws))
    assert (ge[0][~mask] == 0).all() and ge[1].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_logprobs(backend):
    x, w = _lm()
    ids = torch.randint(0, 13, (9,))
    torch.library.opcheck(OPS.linear_logprobs.default, (x, w, ids, 0.7, 1.2, 3.0, backend))
    x0, w0 = x.detach(), w.detach()
    lp, ent, lse = OPS.linear_logprobs.default(x0, w0, ids, 0.7, 1.2, 3.0, backend)
    g = torch.linspace(-1, 1, 9, dtype=F64)
    for grads in ((g, g, g), (g, None, None), (None, g, None), (None, None, g)):
        torch.library.opcheck(OPS.linear_logprobs_backward.default,
                              (x0, w0, ids, lse, ent, *grads, 0.7, 1.2, 3.0, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_topk(backend):
    x, w = _lm(grad=False)
    torch.library.opcheck(OPS.linear_topk.default, (x, w, 5, 1.0, 1.0, None, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("support,topk", [("full", None), ("teacher_topk", 3), ("teacher_topk", "ids")])
def test_opcheck_divergence(backend, support, topk):
    xs, ws = _lm(seed=1)
    xt, wt = _lm(grad=False, seed=2)
    mask = torch.tensor([True, False, True, True, True, False, True, True, True])
    ids = torch.stack([torch.randperm(13)[:3] for _ in range(9)]) if topk == "ids" else None
    k = 3 if topk == 3 else 0
    opts = (0.9, 1.0, 4.0, "reverse_kl", 0.5, support, "bucket", None, backend)
    sids = torch.arange(9) % 13  # token statistics (stats_ids) on the same logits, or none
    for m, st in ((None, None), (mask, None), (mask, sids)):
        torch.library.opcheck(OPS.linear_divergence.default, (xs, ws, xt, wt, m, ids, k, st, *opts))
        for reduction in ("sum", "mean"):
            torch.library.opcheck(OPS.linear_divergence_reduced.default,
                                  (xs, ws, xt, wt, m, ids, k, st, reduction, True, *opts))
            torch.library.opcheck(OPS.linear_divergence_reduced.default,  # no gradient: constant inputs
                                  (xs.detach(), ws.detach(), xt, wt, m, ids, k, st, reduction, False, *opts))
    _, used, _ = OPS.linear_divergence.default(xs.detach(), ws.detach(), xt, wt, mask, ids, k, None, *opts)
    saved = used if (ids is None and support == "teacher_topk") else ids
    grad = torch.linspace(0.5, 2, 9, dtype=F64)
    torch.library.opcheck(OPS.linear_divergence_backward.default,
                          (xs.detach(), ws.detach(), xt, wt, mask, saved, grad, *opts))


# ----------------------------------------------------------------------------- attention ops

# "auto": dispatch on CPU tensors passes over the C++ backend (no attention kernels) to the reference
ATTN_BACKENDS = ["reference", "reference-chunked", "auto"]


def _attn_backend(name, monkeypatch):
    if name == "reference-chunked":
        from copsd.backends import _reference_attention

        monkeypatch.setattr(_reference_attention, "USE_CPU_FLASH", False)
    return "auto" if name == "auto" else "reference"


def _attn_inputs(b=2, s=5, hq=4, hkv=2, d=8, p=3, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, s, hq, d), (b, s, hkv, d), (b, s, hkv, d), (p, hkv, d), (p, hkv, d)]
    return tuple(torch.randn(*sh, generator=g, dtype=F64).requires_grad_(grad) for sh in shapes)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_shared_prefix_attention_compiles(backend, padded, monkeypatch):
    backend = _attn_backend(backend, monkeypatch)
    inputs = _attn_inputs()
    lens = torch.tensor([5, 2]) if padded else None
    w_o = torch.linspace(-1, 1, 2 * 5 * 4 * 8, dtype=F64).reshape(2, 5, 4, 8)

    def f(q, k, v, pk, pv):
        o, lse = shared_prefix_attention(q, k, v, pk, pv, scale=0.4, seq_lens=lens, backend=backend)
        return (o * w_o).sum() + 0.3 * torch.where(torch.isfinite(lse), lse, 0).sum()

    ge = _compiled_matches_eager(f, inputs, inputs)
    assert all(g.abs().sum() > 0 for g in ge)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_merge_attention_states_compiles(backend, monkeypatch):
    backend = _attn_backend(backend, monkeypatch)
    g = torch.Generator().manual_seed(3)
    o_a, o_b = (torch.randn(2, 4, 3, 8, generator=g, dtype=F64).requires_grad_() for _ in range(2))
    lse_a, lse_b = (torch.randn(2, 3, 4, generator=g, dtype=F64) for _ in range(2))
    lse_a[0, 0, 1] = lse_b[0, 0, 1] = float("-inf")  # an empty row: zero gradients, no NaN
    lse_a, lse_b = lse_a.requires_grad_(), lse_b.requires_grad_()
    w_o = torch.linspace(-1, 1, 2 * 4 * 3 * 8, dtype=F64).reshape(2, 4, 3, 8)

    def f(o_a, lse_a, o_b, lse_b):
        o, lse = merge_attention_states(o_a, lse_a, o_b, lse_b, backend=backend)
        return (o * w_o).sum() + 0.3 * torch.where(torch.isfinite(lse), lse, 0).sum()

    inputs = (o_a, lse_a, o_b, lse_b)
    ge = _compiled_matches_eager(f, inputs, inputs)
    for g in ge:  # equal to the compiled gradients, checked above
        assert not g.isnan().any()


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("p", [0, 3])
def test_opcheck_shared_prefix_attention(backend, p, monkeypatch):
    backend = _attn_backend(backend, monkeypatch)
    q, k, v, pk, pv = _attn_inputs(p=p)
    lens = torch.tensor([5, 2])
    for sl in (None, lens):
        torch.library.opcheck(OPS.shared_prefix_attention.default, (q, k, v, pk, pv, 0.4, sl, backend, True))
    args = tuple(t.detach() for t in (q, k, v, pk, pv))
    o, lse = OPS.shared_prefix_attention.default(*args, 0.4, lens, backend, False)
    g_o, g_lse = torch.randn_like(o), torch.randn_like(lse)
    torch.library.opcheck(OPS.shared_prefix_attention_backward.default, (*args, 0.4, lens, o, lse, g_o, g_lse))


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_opcheck_merge_attention_states(backend, monkeypatch):
    backend = _attn_backend(backend, monkeypatch)
    g = torch.Generator().manual_seed(4)
    o_a, o_b = (torch.randn(2, 4, 3, 8, generator=g, dtype=F64).requires_grad_() for _ in range(2))
    lse_a, lse_b = (torch.randn(2, 3, 4, generator=g, dtype=F64).requires_grad_() for _ in range(2))
    torch.library.opcheck(OPS.merge_attention_states.default, (o_a, lse_a, o_b, lse_b, backend, True))
    args = tuple(t.detach() for t in (o_a, lse_a, o_b, lse_b))
    o, lse = OPS.merge_attention_states.default(*args, backend, False)
    torch.library.opcheck(OPS.merge_attention_states_backward.default,
                          (*args, lse, torch.randn_like(o), torch.randn_like(lse)))
