"""Two CPU processes (gloo, DDP through accelerate) give the result of one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import tiny_model_dir, tiny_sft_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(argv, cwd):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_two_processes_equal_one(tmp_path):
    from copsd.data import bundled

    student = tiny_model_dir(tmp_path / "student")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model_name_or_path: {student}\nconstitution: {bundled('constitution.md')}\n"
        f"dataset: {bundled('tiny_prompts.jsonl')}\nteacher_mode: initial\nnum_generations: 4\n"
        "max_completion_length: 4\nmax_steps: 2\nlearning_rate: 1.0e-2\nreport_to: [jsonl]\n"
        "disable_tqdm: true\nbackend: reference\nmax_grad_norm: 0.5\n"
        # one prompt per generation call: batch composition then cannot change a prompt's logits
        "generation_batch_size: 4\n")
    # one process: 2 prompts per step as 2 accumulated micro-batches of one prompt group each
    _run([sys.executable, "-m", "copsd.cli", "distill", "--config", str(cfg), "--output_dir", "one",
          "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"], tmp_path)
    # two processes: one prompt group each
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
          str(29500 + os.getpid() % 1000), "-m", "copsd.cli", "distill", "--config", str(cfg),
          "--output_dir", "two", "--per_device_train_batch_size", "4"], tmp_path)
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    init = load_file(os.path.join(student, "model.safetensors"))
    assert any(not torch.equal(a[k], init[k]) for k in a), "training did not change the weights"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for m1, m2 in zip(one, two):
        for k in ("loss", "reward", "completion_length", "entropy", "grad_norm", "kl"):
            assert m1[k] == pytest.approx(m2[k], rel=1e-4, abs=1e-6), k


def test_sft_two_processes_equal_one(tmp_path):
    cfg = tiny_sft_config(tmp_path, tiny_model_dir(tmp_path / "student"))
    _run([sys.executable, "-m", "copsd.cli", "sft-teacher", "--config", str(cfg), "--output_dir", "one",
          "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2"], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
          str(30500 + os.getpid() % 1000), "-m", "copsd.cli", "sft-teacher", "--config", str(cfg),
          "--output_dir", "two", "--per_device_train_batch_size", "1"], tmp_path)
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)

