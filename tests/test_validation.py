"""Every public op rejects bad input with a ValueError that names the argument."""

import pytest
import torch

from copsd import backends
from copsd.ops import available_backends, linear_divergence, linear_logprobs, linear_topk


def _ok():
    return torch.randn(4, 3), torch.randn(10, 3), torch.randn(4, 3), torch.randn(10, 3)


BAD_DIVERGENCE = [
    (dict(student_hidden=torch.randn(4, 2)), "student_hidden"),
    (dict(student_hidden=torch.randn(4)), "student_hidden"),
    (dict(student_hidden=torch.randint(0, 3, (4, 3))), "student_hidden"),
    (dict(teacher_hidden=torch.randn(5, 3)), "teacher_hidden"),
    (dict(teacher_weight=torch.randn(11, 3)), "teacher_weight"),
    (dict(student_weight=[[1.0]]), "student_weight"),
    (dict(kind="kl"), "kind"),
    (dict(kind="jsd", beta=1.0), "beta"),
    (dict(kind="jsd", beta=0.0), "beta"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(logit_scale=-1.0), "logit_scale"),
    (dict(softcap=0.0), "softcap"),
    (dict(term_clip=float("inf")), "term_clip"),
    (dict(mask=torch.ones(4)), "mask"),
    (dict(mask=torch.ones(3, dtype=torch.bool)), "mask"),
    (dict(support="topk"), "support"),
    (dict(support="teacher_topk"), "topk"),
    (dict(support="teacher_topk", topk=11), "topk"),
    (dict(support="teacher_topk", topk=0), "topk"),
    (dict(support="teacher_topk", topk=torch.tensor([[0, 1]] * 3)), "topk"),
    (dict(support="teacher_topk", topk=torch.tensor([[0, 10]] * 4)), "topk"),
    (dict(support="teacher_topk", topk=torch.tensor([[1, 1]] * 4)), "topk"),
    (dict(support="teacher_topk", topk=torch.tensor([[0.0, 1.0]] * 4)), "topk"),
    (dict(topk=3), "topk"),
    (dict(support="teacher_topk", topk=2, tail="drop"), "tail"),
    (dict(reduction="avg"), "reduction"),
    (dict(backend="nope"), "backend"),
    (dict(backend=3), "backend"),
]


@pytest.mark.parametrize("bad,name", BAD_DIVERGENCE)
def test_linear_divergence_rejects(bad, name):
    xs, ws, xt, wt = _ok()
    args = dict(student_hidden=xs, student_weight=ws, teacher_hidden=xt, teacher_weight=wt)
    for key in list(bad):
        if key in args:
            args[key] = bad.pop(key)
    with pytest.raises(ValueError, match=name):
        linear_divergence(args["student_hidden"], args["student_weight"], args["teacher_hidden"],
                          args["teacher_weight"], **bad)


def test_linear_divergence_rejects_device_and_dtype_mismatch():
    xs, ws, xt, wt = _ok()
    with pytest.raises(ValueError, match="student_weight"):
        linear_divergence(xs, torch.randn(10, 3, device="meta"), xt, wt)
    with pytest.raises(ValueError, match="mask"):
        linear_divergence(xs, ws, xt, wt, mask=torch.ones(4, dtype=torch.bool, device="meta"))


@pytest.mark.parametrize("bad,name", [
    (dict(ids=torch.tensor([0, 1, 2])), "ids"),
    (dict(ids=torch.tensor([0, 1, 2, 10])), "ids"),
    (dict(ids=torch.tensor([0, 1, 2, -1])), "ids"),
    (dict(ids=torch.tensor([0.0, 1.0, 2.0, 3.0])), "ids"),
    (dict(weight=torch.randn(10, 4)), "weight"),
    (dict(hidden=torch.randn(4, 3, dtype=torch.float64), weight=torch.randn(0, 3, dtype=torch.float64)), "weight"),
    (dict(temperature=-2.0), "temperature"),
    (dict(softcap=float("nan")), "softcap"),
])
def test_linear_logprobs_rejects(bad, name):
    args = dict(hidden=torch.randn(4, 3), weight=torch.randn(10, 3), ids=torch.tensor([0, 1, 2, 3]))
    for key in list(bad):
        if key in args:
            args[key] = bad.pop(key)
    with pytest.raises(ValueError, match=name):
        linear_logprobs(args["hidden"], args["weight"], args["ids"], **bad)


@pytest.mark.parametrize("k", [0, 11, 2.0, True])
def test_linear_topk_rejects_k(k):
    with pytest.raises(ValueError, match="k must"):
        linear_topk(torch.randn(4, 3), torch.randn(10, 3), k)


def test_backend_override_and_unavailable(monkeypatch):
    xs, ws, xt, wt = _ok()
    assert "reference" in available_backends()
    monkeypatch.setenv("COPSD_BACKEND", "reference")
    assert backends.get("divergence", xs.device).NAME == "reference"
    monkeypatch.setenv("COPSD_BACKEND", "warp-drive")
    with pytest.raises(ValueError, match="COPSD_BACKEND"):
        linear_divergence(xs, ws, xt, wt)
    monkeypatch.delenv("COPSD_BACKEND")
    missing = [b for b in ("cpu", "triton", "cuda") if b not in available_backends()]
    for b in missing:
        with pytest.raises(ValueError, match="available backends"):
            linear_divergence(xs, ws, xt, wt, backend=b)


def test_auto_picks_a_backend_for_cpu_tensors():
    xs = torch.randn(2, 3)
    name = backends.get("divergence", xs.device).NAME
    assert name == ("cpu" if "cpu" in available_backends() else "reference")
