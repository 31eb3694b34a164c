"""FSDP2 (fully_shard) on CPU with two gloo processes: the sharding really happens, training equals one
process with the same global batch, checkpoints are full HF weights, and a SIGKILLed run resumes exactly.

The runs are launched with ``accelerate launch --config_file examples/accelerate/fsdp2_1node_8gpu.yaml
--num_processes 2``; on a machine without GPUs accelerate starts gloo processes.  accelerate itself would
run such a config on CPU as plain DDP, so each test reads the layout both processes log (every parameter a
DTensor on a 2-way mesh, each holding part of it) to prove the sharding happened.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from killrun import sigkill_after_checkpoint
from safetensors.torch import load_file
from test_trainer import tiny_model_dir, tiny_sft_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}

# fp32 on one CPU: the sharded run sums the same per-process gradients in another order (reduce-scatter vs
# accumulation; a tied embedding adds its lookup and head gradients in another order too), so weights agree
# to rounding, not bit for bit.  AdamW's step is lr m / (sqrt(v) + eps), ~lr sign(g) wherever |g| >> eps: with
# the default eps 1e-8 a gradient that is rounding noise around an exact zero (a key bias, an unused vocabulary
# row) moves its weight by a whole step whose sign the summation order picks, i.e. the BLAS and the ISA (seen:
# 4e-5 apart on an AMD EPYC, within 1e-5 on a Xeon).  The equivalence runs therefore use eps 1e-2
# (LINEAR_ADAMW): steps stay linear in such gradients, so what is compared is the gradients' agreement, not the
# sign of their rounding noise (then 5e-7 apart; weights still move by up to 5e-2, mean 1e-3, at learning_rate
# 1e-2).  ATOL is 1e-5, a thousandth of one step's update.
RTOL, ATOL = 1e-5, 1e-5
LINEAR_ADAMW = "adam_epsilon: 1.0e-2\n"


def _env(extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for k in FSDP_ENV:
        env.pop(k, None)
    env.update(extra or {})
    return env


def _port():
    """A port free right now (the OS picks it), so parallel jobs on one machine do not collide."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run(argv, cwd, extra_env=None):
    r = subprocess.run(argv, cwd=cwd, env=_env(extra_env), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def _two(args):
    """Two processes through ``accelerate launch`` with the example FSDP2 config (which also sets the
    environment; FSDP_ENV is passed as well so that nothing else decides)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            os.path.join(REPO, "examples", "accelerate", "fsdp2_1node_8gpu.yaml"), "--num_processes", "2",
            "--main_process_port", _port(), "-m", "copsd.cli", *args]


def _assert_sharded(stderr: str):
    """Both processes logged their layout: every parameter a DTensor on a 2-way mesh, holding part of it."""
    lines = re.findall(r"FSDP2: process (\d) of 2: (\d+) of (\d+) parameters are DTensors sharded over a "
                       r"(\d+)-way mesh; this process holds (\d+) of their (\d+) elements", stderr)
    assert sorted(int(x[0]) for x in lines) == [0, 1], stderr[-3000:]
    held = 0
    for _, n_dt, n_all, mesh, local, total in lines:
        assert int(n_dt) == int(n_all) > 0 and int(mesh) == 2
        assert 0 < int(local) < int(total)
        held += int(local)
    assert held == int(lines[0][5])  # the two shards hold each element exactly once


def _weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def _distill_cfg(tmp_path, student, extra="", teacher_mode="initial", optim=LINEAR_ADAMW):
    from copsd.data import bundled

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model_name_or_path: {student}\nconstitution: {bundled('constitution.md')}\n"
        f"dataset: {bundled('tiny_prompts.jsonl')}\nteacher_mode: {teacher_mode}\nnum_generations: 4\n"
        "max_completion_length: 4\nlearning_rate: 1.0e-2\nreport_to: [jsonl]\n"
        "disable_tqdm: true\nbackend: reference\nmax_grad_norm: 0.5\ngeneration_batch_size: 4\n" + optim + extra)
    return cfg


def _tied_model_dir(path):
    """A tiny Qwen2 with tied input and output embeddings (one parameter for both)."""
    from test_trainer import tiny_tokenizer

    from copsd._hf import tiny_causal_lm

    tok = tiny_tokenizer()
    m = tiny_causal_lm("qwen2", vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=64, max_position_embeddings=512, tie_word_embeddings=True,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    m.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("objective,teacher_mode,tied", [("paper", "initial", False), ("reverse_kl", "initial", False),
                                                         ("paper", "ema", False), ("paper", "initial", True)])
def test_fsdp2_two_processes_equal_one(tmp_path, objective, teacher_mode, tied):
    student = (_tied_model_dir if tied else tiny_model_dir)(tmp_path / "student")
    cfg = _distill_cfg(tmp_path, student, f"max_steps: 2\nobjective: {objective}\nkl_coef: 0.05\n", teacher_mode)
    # one process, no FSDP: 2 prompts per step as 2 accumulated micro-batches of one prompt group each
    _run([sys.executable, "-m", "copsd.cli", "distill", "--config", str(cfg), "--output_dir", "one",
          "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"], tmp_path)
    # two processes, FSDP2: one prompt group each
    r = _run(_two(["distill", "--config", str(cfg), "--output_dir", "two", "--per_device_train_batch_size", "4"]),
             tmp_path, FSDP_ENV)
    _assert_sharded(r.stderr)
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    init = _weights(student)
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], init[k]) for k in a), "training did not change the weights"
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    assert not torch.equal(a[head], init[head]), "the lm_head got no gradient"
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=RTOL, atol=ATOL)
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(one) == len(two) == 2
    for m1, m2 in zip(one, two):
        for k in ("loss", "reward", "completion_length", "entropy", "grad_norm", "kl"):
            assert m2[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-6), k
    # the final model is a plain transformers checkpoint
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(tmp_path / "two"))
    torch.testing.assert_close(m.lm_head.weight.detach(), b[head], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["paper", "reverse_kl"])
def test_fsdp2_lora_two_processes_equal_one(tmp_path, objective):
    pytest.importorskip("peft")
    student = tiny_model_dir(tmp_path / "student")
    cfg = _distill_cfg(tmp_path, student, f"max_steps: 2\nobjective: {objective}\nkl_coef: 0.05\nuse_peft: true\n"
                                          "lora_r: 4\nlora_alpha: 8\nlora_dropout: 0.0\nlearning_rate: 5.0e-2\n")
    _run([sys.executable, "-m", "copsd.cli", "distill", "--config", str(cfg), "--output_dir", "one",
          "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"], tmp_path)
    r = _run(_two(["distill", "--config", str(cfg), "--output_dir", "two", "--per_device_train_batch_size", "4"]),
             tmp_path, FSDP_ENV)
    _assert_sharded(r.stderr)
    init = _weights(student)
    for name in ("adapter/adapter_model.safetensors", "model.safetensors"):  # the adapter and the merged model
        a, b = load_file(str(tmp_path / "one" / name)), load_file(str(tmp_path / "two" / name))
        assert a.keys() == b.keys(), name
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=RTOL, atol=ATOL)
    merged = _weights(tmp_path / "two")
    assert any(not torch.equal(merged[k], init[k]) for k in init), "LoRA training did not change the model"


@pytest.mark.slow
def test_fsdp2_sft_two_processes_equal_one(tmp_path):
    cfg = tiny_sft_config(tmp_path, tiny_model_dir(tmp_path / "student"))
    cfg.write_text(cfg.read_text() + LINEAR_ADAMW)
    # gradient accumulation under FSDP2 too: 1 process x 4 micro-batches = 2 processes x 2 micro-batches
    _run([sys.executable, "-m", "copsd.cli", "sft-teacher", "--config", str(cfg), "--output_dir", "one",
          "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "4"], tmp_path)
    r = _run(_two(["sft-teacher", "--config", str(cfg), "--output_dir", "two", "--per_device_train_batch_size",
                   "1", "--gradient_accumulation_steps", "2"]), tmp_path, FSDP_ENV)
    _assert_sharded(r.stderr)
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=RTOL, atol=ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["", LINEAR_ADAMW], ids=["default_eps", "eps_1e-2"])
def test_fsdp2_sigkill_then_resume_matches_uninterrupted(tmp_path, optim):
    student = tiny_model_dir(tmp_path / "student")
    # a run against itself, bit for bit, on two trajectories: AdamW's default eps, as a user trains, and eps 1e-2
    # (LINEAR_ADAMW).  The second caught a resumed run starting with an empty teacher prefix cache (see
    # TeacherScorer.cache_state): its teacher hidden states differed from the uninterrupted run's by rounding;
    # on the default-eps trajectory such a difference happened to vanish before the advantages.
    cfg = _distill_cfg(tmp_path, student, "max_steps: 4\nsave_steps: 2\nlr_scheduler_type: linear\n"
                                          "num_mini_batches: 2\nper_device_train_batch_size: 4\n", optim=optim)
    _run(_two(["distill", "--config", str(cfg), "--output_dir", "full"]), tmp_path, FSDP_ENV)

    out = tmp_path / "killed"
    sigkill_after_checkpoint(_two(["distill", "--config", str(cfg), "--output_dir", str(out)]), out, 2,
                             env=_env(FSDP_ENV), cwd=tmp_path)  # the launcher and both workers
    ckpt = out / "checkpoint-2"
    assert sorted(f for f in os.listdir(ckpt) if f.startswith("optimizer")) == [
        "optimizer-shard-00000-of-00002.pt", "optimizer-shard-00001-of-00002.pt"]
    # the checkpoint's weights are whole (gathered), loadable by transformers
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(ckpt))
    assert m.lm_head.weight.shape == _weights(student)["lm_head.weight"].shape

    _run(_two(["distill", "--config", str(cfg), "--output_dir", str(out), "--resume_from_checkpoint", "latest"]),
         tmp_path, FSDP_ENV)
    a, b = _weights(tmp_path / "full"), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full_m = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    res_m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in res_m] == [1, 2, 3, 4]
    assert res_m[-1]["loss"] == full_m[-1]["loss"]


def test_launch_options_copsd_cannot_honour_are_errors(monkeypatch):
    from copsd import fsdp

    for k in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_USE_DEEPSPEED", "FSDP_OFFLOAD_PARAMS",
              "FSDP_ACTIVATION_CHECKPOINTING"):
        monkeypatch.delenv(k, raising=False)
    assert not fsdp.requested()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="fsdp_version"):  # accelerate's default is FSDP1
        fsdp.requested()
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="fsdp_version"):
        fsdp.requested()
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert fsdp.requested()
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ValueError, match="fsdp_offload_params"):
        fsdp.requested()
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "false")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        fsdp.requested()
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "false")
    assert fsdp.requested()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="DeepSpeed"):
        fsdp.requested()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    with pytest.raises(ValueError, match="DeepSpeed"):
        fsdp.requested()


def test_example_accelerate_configs_ask_for_fsdp2():
    import yaml

    for name in ("fsdp2_1node_8gpu.yaml", "fsdp2_2nodes.yaml"):
        with open(os.path.join(REPO, "examples", "accelerate", name)) as f:
            c = yaml.safe_load(f)
        assert c["distributed_type"] == "FSDP" and c["fsdp_config"]["fsdp_version"] == 2, name
        assert not c["fsdp_config"].get("fsdp_offload_params") and not c["fsdp_config"].get(
            "fsdp_activation_checkpointing"), name
    assert c["num_machines"] == 2 and c["num_processes"] == 16


def test_rollout_all_done_keeps_finished_samples():
    """A sharded student decodes until every process is done: with ``all_done`` holding decoding past the
    point where this process's samples all stopped, the samples are those of the early stop."""
    from copsd._hf import tiny_causal_lm
    from copsd.rollout import generate

    model = tiny_causal_lm("llama", vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                           intermediate_size=64, seed=3)
    prompts = [[5, 9, 11], [7, 3]]
    kw = dict(num_generations=2, max_new_tokens=12, temperature=1.0)
    free = generate(model, prompts, eos_token_id=[], generator=torch.Generator().manual_seed(0), **kw)
    stops = sorted({c[1] for c in free.completion_ids})  # every sample stops at its 2nd token at the latest
    early = generate(model, prompts, eos_token_id=stops, generator=torch.Generator().manual_seed(0), **kw)
    calls = []

    def not_yet(local_done):
        calls.append(local_done)
        return len(calls) >= 6  # the other processes finish 6 steps later

    late = generate(model, prompts, eos_token_id=stops, generator=torch.Generator().manual_seed(0),
                    all_done=not_yet, **kw)
    assert max(len(c) for c in early.completion_ids) <= 2 and calls[-1] and len(calls) == 6
    assert late.completion_ids == early.completion_ids
    assert late.finish_reason == early.finish_reason == ["stop"] * 4
    for a, b in zip(late.logprobs, early.logprobs):
        assert torch.equal(a, b)


_ONE_PROCESS = r'''
import os, sys, types
import torch, torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from copsd import fsdp
from copsd._hf import tiny_causal_lm
from copsd.checkpoint import load_model_weights
from copsd.training import PolicyHidden

dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
model = tiny_causal_lm("llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=64, seed=0)
whole = {k: v.clone() for k, v in model.state_dict().items()}
acc = types.SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"))
policy = fsdp.shard_policy(PolicyHidden(model), acc, bf16=False, pad_token_id=0)
assert all(isinstance(p, DTensor) for p in model.parameters())
assert isinstance(model.lm_head.weight, DTensor)  # outside a forward
h, w = policy(torch.tensor([[3, 4, 5]]), torch.ones(1, 3, dtype=torch.long))
assert not isinstance(w, DTensor) and torch.equal(w, whole["lm_head.weight"])
(h.sum() + w.sum()).backward()
assert isinstance(model.lm_head.weight.grad, DTensor)
torch.testing.assert_close(model.lm_head.weight.grad.full_tensor(), torch.ones(64, 32) * 1.0)

ckpt = sys.argv[1]
moved = {k: v + 1 for k, v in whole.items()}
save_file(moved, os.path.join(ckpt, "model.safetensors"))
load_model_weights(model, ckpt)  # whole tensors into the sharded parameters
for k, v in model.state_dict().items():
    assert torch.equal(fsdp.full_tensor(v), moved[k]), k
save_file({k: v for k, v in moved.items() if k != "model.norm.weight"}, os.path.join(ckpt, "model.safetensors"))
try:
    load_model_weights(model, ckpt)
except ValueError as e:
    assert "model.norm.weight" in str(e), e
else:
    raise AssertionError("a checkpoint without model.norm.weight was accepted")

opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
policy(torch.tensor([[3, 4, 5]]), torch.ones(1, 3, dtype=torch.long))[0].sum().backward()
opt.step()
saved = fsdp.local_optimizer_state(opt)
torch.save(saved, os.path.join(ckpt, "o.pt"))
opt2 = torch.optim.AdamW(model.parameters(), lr=1e-2)
fsdp.load_local_optimizer_state(opt2, torch.load(os.path.join(ckpt, "o.pt"), weights_only=True))
for p in model.parameters():
    for k, v in opt.state[p].items():
        w = opt2.state[p][k]
        assert type(w) is type(v) and torch.equal(fsdp.full_tensor(w), fsdp.full_tensor(v))
dist.destroy_process_group()
print("OK")
'''


def test_one_process_sharded_head_weight_loading_and_optimizer_state(tmp_path):
    """fully_shard on a 1-way mesh (one process, fast): the head weight is whole inside the policy forward and
    its gradient lands on the sharded parameter; whole checkpoint weights load into DTensors, a missing one
    is an error (a DTensor's data_ptr() is 0, which once made every parameter look tied); optimizer shards
    round-trip through torch.load(weights_only=True)."""
    script = tmp_path / "one.py"
    script.write_text(_ONE_PROCESS)
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-3000:]


_EXIT_PATH = r'''
import atexit, os, sys, threading, time
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from copsd import cli

out = sys.argv[1]
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
t = distribute_tensor(torch.ones(4, 2), init_device_mesh("cpu", (1,)), [Shard(0)])  # torch now holds the group
atexit.register(lambda: open(os.path.join(out, "atexit"), "w").close())
threading.Thread(target=lambda: (time.sleep(0.5), open(os.path.join(out, "thread"), "w").close())).start()
print("buffered", end="")
assert cli._close_process_group() and not dist.is_initialized()
cli._end_process(3)
raise AssertionError("_end_process returned")
'''


def test_multiprocess_exit_skips_teardown_after_flushing(tmp_path):
    """A launched worker ends with _close_process_group + _end_process: the exit code is the run's, our threads
    are joined, atexit handlers run and stdout is flushed, and nothing runs after (no interpreter teardown,
    where the gloo backend torch keeps alive after destroy_process_group used to abort now and then)."""
    script = tmp_path / "exit.py"
    script.write_text(_EXIT_PATH)
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 3, r.stderr[-3000:]
    assert r.stdout == "buffered"
    assert (tmp_path / "atexit").exists() and (tmp_path / "thread").exists()
    assert "terminate called" not in r.stderr
