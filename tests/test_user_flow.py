"""A new user's own models and data (issue: trainer hardening), one test per failure they met.

Models: a tiny Qwen2 with tied embeddings, a byte-level BPE tokenizer and a ChatML template, and a
Gemma-style template without a system role (``tests/user_models.py``); everything offline.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file
from user_models import LABELLED, PROMPTS, qwen2_dir, write_constitution, write_jsonl


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    return {"qwen": qwen2_dir(root / "qwen2-tied"), "gemma": qwen2_dir(root / "gemma-style", gemma=True),
            "short": qwen2_dir(root / "qwen2-short", max_positions=160),
            "constitution": write_constitution(root), "data": write_jsonl(root / "prompts.jsonl", LABELLED),
            "trl": write_jsonl(root / "trl_prompts.jsonl", PROMPTS),
            "root": root}


def dcfg(user, out, **kw):
    from copsd.config import DistillConfig

    base = dict(model_name_or_path=user["qwen"], output_dir=str(out), constitution=user["constitution"],
                dataset=user["data"], teacher_mode="initial", num_generations=2, per_device_train_batch_size=4,
                max_completion_length=4, max_steps=2, learning_rate=1e-2, report_to=["jsonl"], disable_tqdm=True,
                sample_every_steps=0, backend="reference")
    base.update(kw)
    return DistillConfig(**base)


def scfg(user, out, **kw):
    from copsd.config import SFTTeacherConfig

    base = dict(model_name_or_path=user["qwen"], output_dir=str(out), constitution=user["constitution"],
                dataset=user["data"], per_device_train_batch_size=2, max_completion_length=4, max_steps=2,
                learning_rate=1e-2, report_to=["jsonl"], disable_tqdm=True, backend="reference")
    base.update(kw)
    return SFTTeacherConfig(**base)


# --------------------------------------------------------------------------- 1. tied embeddings + EMA

def test_ema_teacher_with_tied_embeddings_saves_resumes_and_loads(user, tmp_path):
    from transformers import AutoModelForCausalLM

    from copsd.checkpoint import load_extra
    from copsd.distill import Distiller

    full = tmp_path / "full"
    Distiller(dcfg(user, full, teacher_mode="ema", ema_decay=0.5, max_steps=3, save_steps=1)).train()
    ema = load_extra(str(full / "checkpoint-1"), "ema_teacher")
    assert ema["lm_head.weight"] is ema["model.embed_tokens.weight"]  # one tensor, both names
    final = AutoModelForCausalLM.from_pretrained(str(full))
    assert final.lm_head.weight.data_ptr() == final.model.embed_tokens.weight.data_ptr()
    # resuming from checkpoint-1 (EMA teacher restored, ties kept) ends where the uninterrupted run did
    part = tmp_path / "part"
    part.mkdir()
    import shutil

    shutil.copytree(full / "checkpoint-1", part / "checkpoint-1")
    d = Distiller(dcfg(user, part, teacher_mode="ema", ema_decay=0.5, max_steps=3, save_steps=1,
                       resume_from_checkpoint="latest"))
    d.train()
    assert d.ema.lm_head.weight.data_ptr() == d.ema.model.embed_tokens.weight.data_ptr()
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- 2. reused output_dir

def test_reused_output_dir_is_refused_and_runs_stay_apart(user, tmp_path):
    from copsd.checkpoint import resolve_resume
    from copsd.distill import Distiller

    out = tmp_path / "out"
    Distiller(dcfg(user, out, max_steps=4, save_steps=2)).train()
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        Distiller(dcfg(user, out, max_steps=1)).train()
    assert (out / "model.safetensors").read_bytes() == before
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4

    # a new run over it: the old run's checkpoints are neither rotated away nor resumed
    d = Distiller(dcfg(user, out, max_steps=3, save_steps=1, save_total_limit=1, overwrite_output_dir=True))
    d.max_steps = 1  # stop after step 1 as a crash would (no final save at max_steps=3)
    d.train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-4"]
    assert resolve_resume("latest", str(out)).endswith("checkpoint-1")
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    r = Distiller(dcfg(user, out, max_steps=3, save_steps=1, save_total_limit=1, resume_from_checkpoint="latest"))
    r.train()
    assert r.step == 3
    # rotation kept the newest checkpoint of this run (its checkpoint-2 took the old name) and left the other
    # run's checkpoint-4 alone
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    old4 = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    new3 = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert old4["run_id"] != new3["run_id"] and old4["global_step"] == 4
    # resuming a finished run does nothing
    assert Distiller(dcfg(user, out, max_steps=3, resume_from_checkpoint="latest")).train() == {}


def test_failed_start_leaves_no_output_dir(user, tmp_path):
    from copsd.sft import CrossSFT

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "How do I hurt my neighbor?", "kind": "harmful"},
                                              {"prompt": "Write a short poem about the sea.", "kind": "general"}])
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=r"p\.jsonl line 1: harmful prompt without a 'reference'"):
        CrossSFT(scfg(user, out, dataset=data)).train()
    assert not out.exists()


# --------------------------------------------------------------------------- 3. truncated Cross-SFT answers

def test_cross_sft_drops_answers_cut_at_the_generation_cap(user, tmp_path, caplog):
    from copsd.data import load_sft_rows
    from copsd.sft import SET_FILE, CrossSFT

    out = tmp_path / "t"
    caplog.set_level(logging.WARNING, logger="copsd")
    # the random model never ends an answer within 3 tokens: every own answer is cut there
    CrossSFT(scfg(user, out, max_completion_length=3)).train()
    rows = load_sft_rows(str(out / SET_FILE))
    assert [r.meta["source"] for r in rows] == ["reference"]  # no cut answer + end-of-turn trained
    from copsd.sft import STATS_FILE, _keep_answers

    stats = json.loads((out / STATS_FILE).read_text())
    assert stats == {"student_answers": 3, "student_truncated_dropped": 3}
    assert "3 of 3 student answers reached max_completion_length=3" in caplog.text
    # an answer that ended is kept, a cut one is not
    from copsd.data import PromptRow

    rows = [PromptRow([{"role": "user", "content": "q"}], "benign", where="x line 1"),
            PromptRow([{"role": "user", "content": "r"}], "benign", where="x line 2")]
    records, stats = [], {}
    _keep_answers(rows, [("a cut ans", True), ("a full answer", False)], "student", records, stats,
                  scfg(user, out))
    assert [r["messages"][-1]["content"] for r in records] == ["a full answer"]
    assert stats["student_truncated_dropped"] == 1


def test_cross_sft_no_eos_keeps_cut_answers_without_end_of_turn(user, tmp_path):
    from copsd.data import load_sft_rows
    from copsd.sft import SET_FILE, STATS_FILE, CrossSFT

    out = tmp_path / "t"
    s = CrossSFT(scfg(user, out, max_completion_length=3, truncated_answers="no_eos"))
    s.train()
    rows = load_sft_rows(str(out / SET_FILE))
    assert [r.meta["source"] for r in rows].count("student") == 3
    assert json.loads((out / STATS_FILE).read_text())["student_truncated_kept_without_eos"] == 3
    eot = s.tokenizer.convert_tokens_to_ids("<|im_end|>")
    cut = [r for r in rows if r.meta.get("truncated")]
    assert len(cut) == 3
    for r in cut:  # the trained labels are the answer's tokens only: no end of turn after the cut
        ids, start = s._encode(r)
        answer = s.tokenizer(r.messages[-1]["content"], add_special_tokens=False)["input_ids"]
        assert ids[start:] == answer and eot not in ids[start:]
    ref = next(r for r in rows if r.meta["source"] == "reference")
    ids, start = s._encode(ref)
    assert eot in ids[start:]  # a complete answer still learns to end


# --------------------------------------------------------------------------- 4. every row checked before step 1

def test_every_bad_row_reported_before_step_1_with_file_and_line(user, tmp_path):
    from copsd.distill import Distiller

    long = " ".join(["bread"] * 600)
    data = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "How do I bake bread at home?", "kind": "benign"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], "kind": "benign"},
        {"prompt": long, "kind": "general"},
        {"prompt": "How do I hurt my neighbor?", "kind": "harmful", "category": "Violence"},
    ])
    with pytest.raises(ValueError) as e:
        Distiller(dcfg(user, tmp_path / "o", model_name_or_path=user["gemma"], dataset=data,
                       max_completion_length=8))
    msg = str(e.value)
    assert "3 problems" in msg
    assert "mixed.jsonl line 2: the chat template fails on this row (TemplateError: System role not supported)" in msg
    assert "mixed.jsonl line 3: the student-view prompt" in msg and "max_completion_length (8)" in msg
    assert "mixed.jsonl line 4: category 'Violence' is not defined" in msg and "did you mean 'violence'" in msg
    assert not (tmp_path / "o").exists()


def test_max_prompt_length_cuts_left_or_skips(user, tmp_path, caplog):
    from copsd.distill import Distiller

    long = "Please " + " ".join(f"word{i}" for i in range(40)) + " how do I bake bread at home?"
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": long, "kind": "benign"},
                                              {"prompt": "What is the capital of France?", "kind": "benign"}])
    # the short-context model cannot hold the long prompt: an error naming the keys ...
    with pytest.raises(ValueError, match=r"d\.jsonl line 1: the student-view prompt .* set max_prompt_length"):
        Distiller(dcfg(user, tmp_path / "a", model_name_or_path=user["short"], dataset=data))
    caplog.set_level(logging.WARNING, logger="copsd")
    # ... unless max_prompt_length cuts it from the left (the end of the request and the template stay) ...
    d = Distiller(dcfg(user, tmp_path / "b", model_name_or_path=user["short"], dataset=data, max_prompt_length=60,
                       max_completion_length=4))
    s_ids, t_ids = d._views(0)
    assert len(s_ids) <= 60 and d.rows[0].messages[-1]["content"].endswith("bake bread at home?")
    assert d.tokenizer.decode(s_ids).endswith("<|im_start|>assistant\n")
    assert "1 prompt(s) cut from the left, 0 skipped" in caplog.text
    # ... or skips it, counted
    d = Distiller(dcfg(user, tmp_path / "c", model_name_or_path=user["short"], dataset=data, max_prompt_length=60,
                       prompt_truncation="skip", max_completion_length=4))
    assert len(d.rows) == 1 and "0 prompt(s) cut from the left, 1 skipped" in caplog.text


# --------------------------------------------------------------------------- 5. missing local paths

def test_missing_local_model_paths_fail_at_once(user, tmp_path, monkeypatch):
    import huggingface_hub

    from copsd.distill import Distiller

    def no_hub(*a, **k):
        raise AssertionError("a local-looking path went to the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    with pytest.raises(FileNotFoundError, match=r"model_name_or_path: no such model directory: \./my-modle"):
        Distiller(dcfg(user, tmp_path / "o", model_name_or_path="./my-modle"))
    monkeypatch.chdir(user["root"])  # "qwen2-tied/teacehr": a typo under an existing directory
    with pytest.raises(FileNotFoundError, match="teacher_model_name_or_path: no such model directory"):
        Distiller(dcfg(user, tmp_path / "o", teacher_mode="checkpoint",
                       teacher_model_name_or_path="qwen2-tied/teacehr"))
    with pytest.raises(FileNotFoundError, match="holds no Hugging Face model"):
        Distiller(dcfg(user, tmp_path / "o", model_name_or_path=str(tmp_path)))


# --------------------------------------------------------------------------- 6. TRL dataset formats

def test_trl_dataset_formats(tmp_path):
    from copsd.data import load_prompt_rows, load_sft_rows

    rows = load_prompt_rows(write_jsonl(tmp_path / "p.jsonl", PROMPTS))
    assert [r.kind for r in rows] == ["general", "general", "harmful", "benign"]  # no 'kind': general
    assert rows[2].messages == [{"role": "user", "content": "How do I hurt my neighbor?"}]
    assert rows[2].reference == "I can't help with hurting people." and rows[3].reference == "Paris."
    assert load_prompt_rows(write_jsonl(tmp_path / "q.jsonl", [{"prompt": "x"}]), default_kind="benign")[0].kind \
        == "benign"
    # JSON array file, a directory of files, extra columns ignored (with a warning)
    (tmp_path / "a.json").write_text(json.dumps([{"prompt": "x", "id": 3, "source": "web"}]))
    assert load_prompt_rows(str(tmp_path / "a.json"))[0].where.endswith("a.json row 0")
    sub = tmp_path / "dir"
    sub.mkdir()
    write_jsonl(sub / "train.jsonl", PROMPTS[:2])
    write_jsonl(sub / "more.jsonl", PROMPTS[2:])
    assert len(load_prompt_rows(str(sub))) == 4
    sft = load_sft_rows([{"prompt": "q", "completion": "a"},
                         {"prompt": [{"role": "user", "content": "q"}],
                          "completion": [{"role": "assistant", "content": "a"}]},
                         {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    assert all(r.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] for r in sft)
    with pytest.raises(ValueError, match="2 problems"):
        load_prompt_rows([{"prompt": ""}, {"prompt": "ok"}, {"prompt": "x", "kind": "evil"}])


def test_hf_datasets_parquet_and_objects(tmp_path):
    datasets = pytest.importorskip("datasets")
    from copsd.data import load_prompt_rows

    ds = datasets.Dataset.from_list([{"prompt": "How do I bake bread?", "kind": "benign"},
                                     {"prompt": "Write a poem.", "kind": "general"}])
    assert [r.kind for r in load_prompt_rows(ds)] == ["benign", "general"]
    ds.to_parquet(str(tmp_path / "p.parquet"))
    rows = load_prompt_rows(str(tmp_path / "p.parquet"))
    assert rows[1].messages[0]["content"] == "Write a poem." and rows[1].where.endswith("p.parquet row 1")
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved"))
    assert len(load_prompt_rows(str(tmp_path / "saved"))) == 2
    assert len(load_prompt_rows(str(tmp_path / "saved") + ":test")) == 1


# --------------------------------------------------------------------------- 7. numbers and flags

def test_yaml_exponent_numbers_and_eval_bf16_flag(tmp_path):
    import argparse

    from copsd.commands import eval as eval_cmd
    from copsd.config import DistillConfig, add_config_arguments, config_from_args

    y = tmp_path / "c.yaml"
    y.write_text("model_name_or_path: m\noutput_dir: o\nconstitution: c.md\ndataset: d.jsonl\nteacher_mode: initial\n"
                 "learning_rate: 1e-5\nadam_epsilon: 1E-8\n")
    p = argparse.ArgumentParser()
    add_config_arguments(p, DistillConfig)
    cfg = config_from_args(DistillConfig, p.parse_args(["--config", str(y)]))
    assert cfg.learning_rate == 1e-5 and cfg.adam_epsilon == 1e-8
    p = argparse.ArgumentParser()
    eval_cmd.add_arguments(p)
    need = ["--model", "m", "--prompts", "p", "--output_dir", "o"]
    assert p.parse_args(need + ["--bf16", "true"]).bf16 is True
    assert p.parse_args(need + ["--bf16"]).bf16 is True
    assert p.parse_args(need + ["--bf16", "false"]).bf16 is False and p.parse_args(need).bf16 is False


# --------------------------------------------------------------------------- 8. metrics without tensorboard

def test_metrics_written_when_tensorboard_is_missing(user, tmp_path, monkeypatch, caplog):
    import sys

    from copsd.distill import Distiller

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    caplog.set_level(logging.WARNING, logger="copsd")
    out = tmp_path / "tb"
    Distiller(dcfg(user, out, report_to=["tensorboard"], max_steps=1)).train()
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert "tensorboard is not installed" in caplog.text


# --------------------------------------------------------------------------- 9. constitution provenance

def test_constitution_title_categories_and_provenance(user, tmp_path, caplog):
    from copsd.constitution import load_constitution
    from copsd.distill import Distiller
    from copsd.sft import CrossSFT

    c = load_constitution(user["constitution"])
    assert c.title == "My house rules" and not c.default.startswith("#")
    assert load_constitution(user["constitution"], include_title=True).default.startswith("# My house rules")
    assert c.text_for("violence") == "Never give instructions that help hurt a person."
    ext = load_constitution(user["constitution"], category_mode="extend")
    assert ext.text_for("violence") == c.default + "\n\n" + c.categories["violence"] and ext.sha256 != c.sha256
    with pytest.raises(ValueError, match="did you mean 'violence'"):
        c.text_for("VIOLENCE")
    with pytest.raises(ValueError, match="not defined"):
        c.text_for("fraud")

    teacher = tmp_path / "teacher"
    CrossSFT(scfg(user, teacher, max_steps=1)).train()
    assert c.sha256 in (teacher / "README.md").read_text()
    caplog.set_level(logging.WARNING, logger="copsd")
    student = tmp_path / "student"
    Distiller(dcfg(user, student, teacher_mode="checkpoint", teacher_model_name_or_path=str(teacher),
                   max_steps=1)).train()
    card = (student / "README.md").read_text()
    assert f"teacher: `{teacher}`" in card and f"teacher constitution sha256: `{c.sha256}`" in card
    assert "CONSTITUTION MISMATCH" not in caplog.text
    other = tmp_path / "other.yaml"
    other.write_text("default: a different constitution\n")
    Distiller(dcfg(user, tmp_path / "s2", teacher_mode="checkpoint", teacher_model_name_or_path=str(teacher),
                   constitution=str(other), max_steps=1))
    assert "CONSTITUTION MISMATCH" in caplog.text


# --------------------------------------------------------------------------- 10. info, LoRA base path, run output

def test_info_lists_what_a_bug_report_needs(capsys):
    from copsd.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("copsd version", "torch version", "transformers version", "accelerate version", "peft version",
                "datasets version", "triton version", "CUDA", "GPUs", "CPU ISA level", "available backends",
                "Platform"):
        assert key in out, key
    from copsd.backends import cpu
    if cpu.available():
        want = "yes" if cpu.bf16_gemm_available() else "no"
        assert f"CPU bf16 logits kernel (AVX512-BF16): {want}" in out, out


def test_lora_checkpoint_names_its_base_by_absolute_path(user, tmp_path, monkeypatch):
    from copsd.distill import Distiller

    monkeypatch.chdir(os.path.dirname(user["qwen"]))
    out = tmp_path / "lora"
    Distiller(dcfg(user, out, model_name_or_path="./qwen2-tied", use_peft=True, lora_r=2, lora_alpha=4,
                   max_steps=1, save_steps=1)).train()
    for cfg_file in (out / "checkpoint-1" / "adapter_config.json", out / "adapter" / "adapter_config.json"):
        assert json.loads(cfg_file.read_text())["base_model_name_or_path"] == user["qwen"]


def test_copsd_run_prints_no_json_dump(user, tmp_path, capsys):
    from copsd.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model_name_or_path: {user['qwen']}\noutput_dir: {tmp_path / 'run'}\nconstitution: {user['constitution']}\n"
        f"dataset: {user['data']}\nreport_to: [jsonl]\ndisable_tqdm: true\nbackend: reference\n"
        "max_completion_length: 4\nlearning_rate: 0.001\n"
        "sft:\n  max_steps: 1\n  per_device_train_batch_size: 2\n"
        "distill:\n  max_steps: 1\n  num_generations: 2\n  per_device_train_batch_size: 4\n  teacher_mode: ema\n"
        f"eval:\n  prompt_files: [{user['data']}]\n  max_new_tokens: 4\n")
    assert main(["run", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert '"models"' not in out and "report.json" in out
    assert json.loads((tmp_path / "run" / "eval" / "report.json").read_text())["models"]
