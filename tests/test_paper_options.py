"""The paper-fidelity options of the trainer config: --preset paper, kl_clamp, old_logprobs, loss_aggregation,
weight decay on 1-D parameters, the hybrid routing keys."""

import argparse

import pytest
from test_config import _parse

from copsd.config import (
    PRESETS,
    DistillConfig,
    SFTTeacherConfig,
    add_run_arguments,
    build_config,
    config_from_args,
    preset_values,
    run_config_from_args,
)

BASE = {"model_name_or_path": "m", "output_dir": "o", "constitution": "c.md", "dataset": "d.jsonl",
        "teacher_mode": "initial"}




def test_defaults_that_follow_the_reference():
    cfg = build_config(DistillConfig, BASE).validate()
    assert cfg.kl_clamp == 10.0 and cfg.old_logprobs == "recompute"
    assert cfg.loss_aggregation == "global_token_mean" and cfg.weight_decay_1d_params is False
    assert cfg.judge_kinds == ["general"] and cfg.judge_categories == []


def test_paper_preset_values():
    cfg = build_config(DistillConfig, {**BASE, "preset": "paper"}).validate()
    assert (cfg.num_generations, cfg.max_completion_length, cfg.learning_rate) == (16, 2048, 2e-6)
    prompts = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * cfg.num_mini_batches \
        // cfg.num_generations
    assert prompts == 128 and cfg.num_mini_batches == 4 and cfg.num_train_epochs == 3.0
    assert cfg.old_logprobs == "recompute" and cfg.loss_aggregation == "micro_batch_token_mean"
    assert cfg.weight_decay_1d_params and cfg.weight_decay == 0.01 and cfg.kl_clamp == 10.0
    sft = build_config(SFTTeacherConfig, {"model_name_or_path": "m", "output_dir": "o", "dataset": "d",
                                          "preset": "paper"}).validate()
    assert sft.num_train_epochs == 2.0 and sft.weight_decay_1d_params
    # every preset key is a real field of its class
    for name, per_cls in PRESETS.items():
        for cls in (DistillConfig, SFTTeacherConfig):
            assert set(per_cls.get(cls.__name__, {})) <= set(preset_values(cls, name))


def test_preset_layers_under_yaml_and_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model_name_or_path: m\noutput_dir: o\ndataset: d.jsonl\nteacher_mode: initial\n"
                 "num_generations: 8\nnum_train_epochs: 1\n")
    cfg = config_from_args(DistillConfig, _parse(DistillConfig, ["--config", str(y), "--preset", "paper",
                                                                "--learning_rate", "1e-6"]))
    assert cfg.preset == "paper"
    assert cfg.num_generations == 8 and cfg.num_train_epochs == 1.0      # YAML over preset
    assert cfg.learning_rate == 1e-6                                      # flag over preset
    assert cfg.max_completion_length == 2048                              # preset over default
    cfg = config_from_args(DistillConfig, _parse(DistillConfig, ["--config", str(y)]))
    assert cfg.max_completion_length == DistillConfig.max_completion_length


def test_run_preset_reaches_both_stages(tmp_path):
    p = argparse.ArgumentParser()
    add_run_arguments(p)
    args = p.parse_args(["--model_name_or_path", "m", "--output_dir", str(tmp_path), "--dataset", "d.jsonl",
                         "--preset", "paper", "--distill.num_train_epochs", "2"])
    rc = run_config_from_args(args)
    assert rc.sft.num_train_epochs == 2.0 and rc.sft.weight_decay_1d_params
    assert rc.distill.num_generations == 16 and rc.distill.num_train_epochs == 2.0


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="'preset'"):
        build_config(DistillConfig, {**BASE, "preset": "papers"})
    with pytest.raises(ValueError, match="'old_logprobs'"):
        build_config(DistillConfig, {**BASE, "old_logprobs": "fresh"})
    with pytest.raises(ValueError, match="'loss_aggregation'"):
        build_config(DistillConfig, {**BASE, "loss_aggregation": "sum"})
    with pytest.raises(ValueError, match="'kl_clamp'"):
        build_config(DistillConfig, {**BASE, "kl_clamp": 0.0}).validate()
    with pytest.raises(ValueError, match="'judge_kinds'"):
        build_config(DistillConfig, {**BASE, "judge_kinds": ["generic"]}).validate()
    assert build_config(DistillConfig, {**BASE, "kl_clamp": None}).validate().kl_clamp is None
    assert build_config(DistillConfig, {**BASE, "objective": "hybrid"}).validate().objective == "hybrid"
