import argparse

import pytest

from copsd.config import (
    DistillConfig,
    SFTTeacherConfig,
    add_config_arguments,
    add_run_arguments,
    build_config,
    config_from_args,
    run_config_from_args,
)

BASE = {"model_name_or_path": "m", "output_dir": "o", "constitution": "c.md", "dataset": "d.jsonl",
        "teacher_mode": "initial"}


def _parse(cls, argv):
    p = argparse.ArgumentParser()
    add_config_arguments(p, cls)
    return p.parse_args(argv)


def _yaml(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_then_flags_override(tmp_path):
    path = _yaml(tmp_path, "model_name_or_path: m\noutput_dir: o\nconstitution: c.md\ndataset: d.jsonl\n"
                           "teacher_mode: initial\nlearning_rate: 3.0e-6\nnum_generations: 4\n"
                           "per_device_train_batch_size: 4\nreport_to: [jsonl]\n")
    cfg = config_from_args(DistillConfig, _parse(DistillConfig, ["--config", path, "--learning_rate", "1e-5",
                                                                 "--bf16", "true", "--report_to", "none"]))
    assert cfg.learning_rate == 1e-5 and isinstance(cfg.learning_rate, float)
    assert cfg.num_generations == 4 and cfg.bf16 is True and cfg.report_to == ["none"]
    assert cfg.objective == "paper" and cfg.kl_coef == 0.005 and cfg.dual_clip == 3.0  # paper defaults
    assert cfg.reward_clip_low == -3.0 and cfg.reward_clip_high == 5.0 and cfg.epsilon == 0.2


def test_defaults_not_overridden_by_absent_flags(tmp_path):
    path = _yaml(tmp_path, "\n".join(f"{k}: {v}" for k, v in BASE.items()) + "\nseed: 7\n")
    cfg = config_from_args(DistillConfig, _parse(DistillConfig, ["--config", path]))
    assert cfg.seed == 7


@pytest.mark.parametrize("text, key", [
    ("learning_rat: 1.0e-5", "learning_rat"),
    ("learning_rate: fast", "learning_rate"),
    ("num_generations: 2.5", "num_generations"),
    ("bf16: 1", "bf16"),
    ("objective: forward", "objective"),
    ("report_to: 3", "report_to"),
])
def test_bad_yaml_key_is_named(tmp_path, text, key):
    path = _yaml(tmp_path, "\n".join(f"{k}: {v}" for k, v in BASE.items()) + "\n" + text + "\n")
    with pytest.raises(ValueError, match=rf"'{key}'.*{tmp_path}"):
        config_from_args(DistillConfig, _parse(DistillConfig, ["--config", path]))


def test_bad_flag_is_named():
    with pytest.raises(ValueError, match="'per_device_train_batch_size'.*command line"):
        config_from_args(DistillConfig, _parse(DistillConfig, [f"--{k}={v}" for k, v in BASE.items()]
                                               + ["--per_device_train_batch_size", "many"]))


def test_invalid_yaml_names_line(tmp_path):
    path = _yaml(tmp_path, "a: 1\nb: [unclosed\n")
    with pytest.raises(ValueError, match="line"):
        config_from_args(DistillConfig, _parse(DistillConfig, ["--config", path]))


def test_semantic_checks():
    with pytest.raises(ValueError, match="multiple of num_generations"):
        build_config(DistillConfig, {**BASE, "num_generations": 3, "per_device_train_batch_size": 4}).validate()
    with pytest.raises(ValueError, match="teacher_model_name_or_path"):
        build_config(DistillConfig, {**BASE, "teacher_mode": "checkpoint"}).validate()
    with pytest.raises(ValueError, match="'beta'"):
        build_config(DistillConfig, {**BASE, "objective": "jsd", "beta": 1.0}).validate()
    with pytest.raises(ValueError, match="'model_name_or_path' is required"):
        build_config(DistillConfig, {**BASE, "model_name_or_path": ""}).validate()
    with pytest.raises(ValueError, match="'max_steps'"):
        build_config(DistillConfig, {**BASE, "max_steps": 0}).validate()


def test_resume_from_checkpoint_forms():
    assert build_config(SFTTeacherConfig, {"resume_from_checkpoint": True}).resume_from_checkpoint == "latest"
    assert build_config(SFTTeacherConfig, {"resume_from_checkpoint": False}).resume_from_checkpoint is None
    assert build_config(SFTTeacherConfig, {"resume_from_checkpoint": "x/checkpoint-3"}).resume_from_checkpoint \
        == "x/checkpoint-3"
    ns = _parse(SFTTeacherConfig, ["--resume_from_checkpoint", "true", "--model_name_or_path", "m",
                                   "--output_dir", "o", "--constitution", "c", "--dataset", "d"])
    assert config_from_args(SFTTeacherConfig, ns).resume_from_checkpoint == "latest"


def test_optional_and_list_flags():
    ns = _parse(DistillConfig, [f"--{k}={v}" for k, v in BASE.items()]
                + ["--lora_target_modules", "q_proj,v_proj", "--save_total_limit", "none", "--num-generations", "4"])
    cfg = config_from_args(DistillConfig, ns)
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.save_total_limit is None
    assert cfg.num_generations == 4  # dashed spelling of a key works too


def test_run_config_sections(tmp_path):
    path = _yaml(tmp_path, "model_name_or_path: m\noutput_dir: out\nconstitution: c.md\ndataset: d.jsonl\n"
                           "sft:\n  learning_rate: 1.0e-4\ndistill:\n  num_generations: 4\n"
                           "  per_device_train_batch_size: 4\neval:\n  prompt_files: [a.jsonl]\n")
    p = argparse.ArgumentParser()
    add_run_arguments(p)
    rc = run_config_from_args(p.parse_args(["--config", path, "--distill.max_steps", "3", "--seed", "5"]))
    assert rc.sft.learning_rate == 1e-4 and rc.sft.output_dir == "out/teacher" and rc.sft.seed == 5
    assert rc.distill.num_generations == 4 and rc.distill.max_steps == 3 and rc.distill.seed == 5
    assert rc.distill.teacher_model_name_or_path == "out/teacher" and rc.eval_prompt_files == ["a.jsonl"]
    bad = _yaml(tmp_path, "model_name_or_path: m\nnum_generatons: 4\n")
    with pytest.raises(ValueError, match="num_generatons"):
        run_config_from_args(p.parse_args(["--config", bad]))
    bad = _yaml(tmp_path, "model_name_or_path: m\noutput_dir: o\nconstitution: c\ndataset: d\n"
                          "distill:\n  tempreature: 1\n")
    with pytest.raises(ValueError, match="tempreature"):
        run_config_from_args(p.parse_args(["--config", bad]))
