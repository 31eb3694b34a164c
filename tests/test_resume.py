"""Exact resume: a run SIGKILLed after a checkpoint and resumed ends with the weights of an uninterrupted run."""

import json
import os
import sys

import pytest
import torch
from killrun import sigkill_after_checkpoint
from safetensors.torch import load_file
from test_trainer import distill_cfg, tiny_model_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("m") / "student")


# two PPO mini-batches per rollout batch, so ratios move off 1 and the scheduler counts optimizer steps
COMMON = dict(teacher_mode="ema", ema_decay=0.5, max_steps=6, save_steps=2, lr_scheduler_type="linear",
              warmup_ratio=0.2, max_completion_length=4, learning_rate=5e-3, per_device_train_batch_size=4,
              num_mini_batches=2)


def test_sigkill_then_resume_matches_uninterrupted(student, tmp_path):
    from copsd.config import to_dict
    from copsd.distill import Distiller

    dirs = {"student": student, "teacher": student}
    # uninterrupted, in this process
    full = tmp_path / "full"
    torch.set_num_threads(1)
    Distiller(distill_cfg(dirs, full, **COMMON)).train()

    # killed: the CLI in a subprocess, SIGKILLed as soon as checkpoint-2 is complete
    out = tmp_path / "killed"
    cfg = to_dict(distill_cfg(dirs, out, **COMMON))
    argv = [sys.executable, "-m", "copsd.cli", "distill"]
    for k, v in cfg.items():
        if v is None:
            continue
        argv += [f"--{k}", ",".join(v) if isinstance(v, list) else str(v)]
    sigkill_after_checkpoint(argv, out, 2, env=_env(), timeout=240)

    # resume in this process from the latest complete checkpoint
    resumed = Distiller(distill_cfg(dirs, out, resume_from_checkpoint="latest", **COMMON))
    resumed.train()
    a, b = _weights(full), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ema_a = load_file(str(full / "checkpoint-6" / "ema_teacher.safetensors"))
    ema_b = load_file(str(out / "checkpoint-6" / "ema_teacher.safetensors"))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    with open(out / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == list(range(1, 7))  # resumed steps logged once, none lost
    with open(full / "metrics.jsonl") as f:
        full_m = [json.loads(line) for line in f]
    with open(out / "metrics.jsonl") as f:
        res_m = [json.loads(line) for line in f]
    assert [m["loss"] for m in full_m] == [m["loss"] for m in res_m]


def test_resume_ignores_partial_checkpoint_and_checks_constitution(student, tmp_path):
    from copsd.checkpoint import resolve_resume
    from copsd.distill import Distiller

    dirs = {"student": student, "teacher": student}
    out = tmp_path / "o"
    Distiller(distill_cfg(dirs, out, teacher_mode="initial", max_steps=2, save_steps=1, max_completion_length=3,
                          kl_coef=0.0)).train()
    (out / ".tmp-checkpoint-3").mkdir()  # what a kill during a save leaves behind
    (out / "checkpoint-4").mkdir()       # no trainer_state.json: incomplete
    assert resolve_resume("latest", str(out)).endswith("checkpoint-2")
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        resolve_resume(str(out / "checkpoint-4"), str(out))
    const = tmp_path / "other.yaml"
    const.write_text("default: a different constitution\n")
    d = Distiller(distill_cfg(dirs, out, teacher_mode="initial", max_steps=3, constitution=str(const),
                              resume_from_checkpoint=str(out / "checkpoint-1"), max_completion_length=3))
    with pytest.raises(ValueError, match="trained with constitution"):
        d.train()
    with open(out / "checkpoint-1" / "trainer_state.json") as f:
        state = json.load(f)
    assert state["global_step"] == 1 and len(state["constitution_sha256"]) == 64
    assert state["constitution_sha256"] in (out / "checkpoint-1" / "README.md").read_text()


def test_sft_resume_matches_uninterrupted(student, tmp_path):
    import shutil

    from copsd.config import SFTTeacherConfig
    from copsd.data import bundled
    from copsd.sft import SET_FILE, CrossSFT

    def cfg(out, **kw):
        return SFTTeacherConfig(model_name_or_path=student, output_dir=str(out),
                                constitution=bundled("constitution.md"), dataset=bundled("tiny_prompts.jsonl"),
                                per_device_train_batch_size=3, max_steps=4, save_steps=1, max_completion_length=4,
                                learning_rate=5e-3, lr_scheduler_type="cosine", report_to=["jsonl"],
                                disable_tqdm=True, backend="reference", **kw)

    full, part = tmp_path / "full", tmp_path / "part"
    CrossSFT(cfg(full)).train()
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    shutil.copyfile(full / SET_FILE, part / SET_FILE)
    CrossSFT(cfg(part, resume_from_checkpoint="latest")).train()
    a, b = _weights(full), _weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [json.loads(x)["loss"] for x in (full / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(x)["loss"] for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert resumed == losses[2:]


def test_run_record_follows_the_checkpoints(student, tmp_path, monkeypatch):
    # copsd_run.json says how far a run that died got: the step of its last checkpoint, not the step it started at
    from copsd.distill import Distiller

    out = tmp_path / "died"
    dirs = {"student": student, "teacher": student}
    real = Distiller.train_step

    def dies_at_step_3(self, step):
        if step == 2:  # 0-based: the third step, after checkpoint-2
            raise RuntimeError("killed")
        return real(self, step)

    monkeypatch.setattr(Distiller, "train_step", dies_at_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        Distiller(distill_cfg(dirs, out, **dict(COMMON, max_steps=4))).train()
    assert (out / "checkpoint-2").is_dir()
    with open(out / "copsd_run.json") as f:
        record = json.load(f)
    assert record["global_step"] == 2 and record["finished"] is False and record["max_steps"] == 4, record
