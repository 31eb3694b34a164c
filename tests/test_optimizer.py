"""``make_optimizer``: the fused AdamW kernel for plain parameters (LoRA included) and FSDP2's DTensors, the
``foreach`` loop for other tensor subclasses, the same update as torch's per-parameter loop (to rounding), and
optimizer state written before the change (per-parameter loop, ``fused: None`` in its groups) still loads and
keeps the fused kernel."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import types

import torch

from copsd._hf import tiny_causal_lm
from copsd.training import adamw_implementation, make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = types.SimpleNamespace(learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                            weight_decay=0.05, weight_decay_1d_params=False)


def _model(seed=0, **kw):
    return tiny_causal_lm("qwen2", vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                          intermediate_size=64, seed=seed, tie_word_embeddings=True, **kw)


def _loop_optimizer(model):
    """What make_optimizer built before: the same two groups, torch's default (per-parameter loop on CPU)."""
    ps = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": CFG.weight_decay},
              {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=CFG.learning_rate, betas=(CFG.adam_beta1, CFG.adam_beta2),
                             eps=CFG.adam_epsilon, foreach=False)


def _steps(model, opt, n, seed):
    """``n`` optimizer steps on seeded random gradients (the same for two models with the same shapes: a model's
    own backward would differ in rounding between the two, and AdamW lifts a rounding difference on a
    near-zero gradient, such as a key bias's, to a whole step)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)


def _roundtrip(sd):
    """A state dict through torch.save / torch.load(weights_only=True), as a checkpoint stores it."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _assert_params_close(a, b):
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


def test_fused_for_plain_parameters_same_update_as_the_loop():
    a, b = _model(), _model()
    opt_a, opt_b = make_optimizer(a, CFG), _loop_optimizer(b)
    assert all(g["fused"] is True and not g["foreach"] for g in opt_a.param_groups)
    assert [g["weight_decay"] for g in opt_a.param_groups] == [0.05, 0.0]
    before = [p.detach().clone() for p in a.parameters()]
    _steps(a, opt_a, 3, seed=1)
    _steps(b, opt_b, 3, seed=1)
    assert all(not torch.equal(x, p) for x, p in zip(before, a.parameters()))  # every tensor trained
    _assert_params_close(a, b)


def test_state_written_by_the_loop_optimizer_loads_and_stays_fused():
    old_model, new_model = _model(), _model()
    old = _loop_optimizer(old_model)
    _steps(old_model, old, 2, seed=2)
    saved = _roundtrip(old.state_dict())
    assert all(g["fused"] is None for g in saved["param_groups"])  # what checkpoints held before
    new_model.load_state_dict(old_model.state_dict())
    new = make_optimizer(new_model, CFG)
    new.load_state_dict(saved)
    assert all(g["fused"] is True and not g["foreach"] for g in new.param_groups)
    for p_old, p_new in zip(old_model.parameters(), new_model.parameters()):
        s_old, s_new = old.state[p_old], new.state[p_new]
        assert float(s_new["step"]) == float(s_old["step"]) == 2.0
        assert s_new["step"].dtype == torch.float32 and s_new["step"].device == p_new.device
        assert torch.equal(s_new["exp_avg"], s_old["exp_avg"]) and torch.equal(s_new["exp_avg_sq"], s_old["exp_avg_sq"])
    _steps(old_model, old, 2, seed=3)
    _steps(new_model, new, 2, seed=3)
    _assert_params_close(new_model, old_model)
    # and the fused optimizer's own state round-trips
    again = make_optimizer(new_model, CFG)
    again.load_state_dict(_roundtrip(new.state_dict()))
    assert all(g["fused"] is True for g in again.param_groups)


def test_lora_parameters_get_the_fused_kernel():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    opt = make_optimizer(model, CFG)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    assert all(g["fused"] is True for g in opt.param_groups)
    before = [p.detach().clone() for p in trainable]
    _steps(model, opt, 1, seed=4)
    assert any(not torch.equal(x, p) for x, p in zip(before, trainable))


def test_implementation_choice():
    p = torch.nn.Parameter(torch.zeros(3))
    assert adamw_implementation([p, torch.zeros(2, 2)]) == {"fused": True, "foreach": None}

    class Wrapped(torch.Tensor):  # a tensor subclass other than DTensor gets the foreach loop
        pass

    assert adamw_implementation([p, torch.zeros(2).as_subclass(Wrapped)]) == {"fused": None, "foreach": True}
    assert adamw_implementation([p, torch.zeros(2, dtype=torch.long)]) == {"fused": None, "foreach": True}


_DTENSOR = r'''
import types
import torch, torch.distributed as dist
from torch.distributed.tensor import DTensor
from copsd import fsdp
from copsd._hf import tiny_causal_lm
from copsd.training import PolicyHidden, make_optimizer

dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
model = tiny_causal_lm("qwen2", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=64, seed=0, tie_word_embeddings=True)
acc = types.SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"))
policy = fsdp.shard_policy(PolicyHidden(model), acc, bf16=False, pad_token_id=0)
assert all(isinstance(p, DTensor) for p in model.parameters())
cfg = types.SimpleNamespace(learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                            weight_decay=0.05, weight_decay_1d_params=False)
opt = make_optimizer(model, cfg)
assert all(g["fused"] is True and not g["foreach"] for g in opt.param_groups)
before = [p.full_tensor().clone() for p in model.parameters()]
h, w = policy(torch.tensor([[3, 4, 5]]), torch.ones(1, 3, dtype=torch.long))
(h @ w.T).logsumexp(-1).sum().backward()
opt.step()
assert all(not torch.equal(b, p.full_tensor()) for b, p in zip(before, model.parameters()))
again = make_optimizer(model, cfg)
fsdp.load_local_optimizer_state(again, fsdp.local_optimizer_state(opt))
assert all(g["fused"] is True and not g["foreach"] for g in again.param_groups)
print("OK")
'''


def test_fsdp2_dtensor_parameters_get_the_fused_kernel(tmp_path):
    script = tmp_path / "dtensor.py"
    script.write_text(_DTENSOR)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-3000:]
