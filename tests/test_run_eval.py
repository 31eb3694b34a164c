"""``copsd run``'s evaluation (the ``eval:`` section has ``copsd eval``'s options: judge, greedy, ...) and the
teacher view of ``copsd eval`` (``teacher_template``, ``category_mode``, ``constitution_title`` as in training).

Models: the tiny Qwen2 with tied embeddings and a byte-level BPE tokenizer of ``tests/user_models.py``, and its
constitution with a ``# title`` and a ``violence`` category; everything offline.
"""

from __future__ import annotations

import argparse
import json
import logging

import pytest
from user_models import LABELLED, qwen2_dir, write_constitution, write_jsonl


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_eval")
    return {"qwen": qwen2_dir(root / "qwen2-tied"), "constitution": write_constitution(root),
            "data": write_jsonl(root / "prompts.jsonl", LABELLED), "root": root}


def _run_config(tmp_path, text, argv=()):
    from copsd.config import add_run_arguments, run_config_from_args

    cfg = tmp_path / "run.yaml"
    cfg.write_text("model_name_or_path: m\noutput_dir: out\nconstitution: c.md\ndataset: d.jsonl\n" + text)
    p = argparse.ArgumentParser()
    add_run_arguments(p)
    return run_config_from_args(p.parse_args(["--config", str(cfg), *argv]))


# --------------------------------------------------------------------------- the eval: section

def test_eval_section_takes_copsd_eval_options(tmp_path):
    rc = _run_config(tmp_path, "eval:\n  prompt_files: [a.jsonl]\n  greedy: true\n  judge: /j\n  baseline: teacher\n"
                               "  judge_max_new_tokens: 64\n  judge_batch_size: 2\n  max_new_tokens: 512\n"
                               "  bootstrap: 200\n  ci_level: 0.9\n",
                     ["--eval.judge_batch_size", "3", "--eval.top_p", "0.5"])
    ev = rc.eval
    assert ev.prompt_files == ["a.jsonl"] and ev.greedy is True and ev.judge == "/j" and ev.baseline == "teacher"
    assert ev.judge_max_new_tokens == 64 and ev.judge_batch_size == 3 and ev.max_new_tokens == 512
    assert ev.bootstrap == 200 and ev.ci_level == 0.9 and ev.top_p == 0.5
    assert ev.decoding() == (0.0, 1)  # greedy: temperature 0, one answer per prompt
    assert rc.eval_prompt_files == ["a.jsonl"] and rc.eval_max_new_tokens == 512
    # defaults: copsd eval's
    d = _run_config(tmp_path, "").eval
    assert (d.prompt_files, d.max_new_tokens, d.judge, d.baseline, d.greedy) == ([], 256, None, "base", False)
    assert d.decoding() == (1.0, 4) and d.judge_max_new_tokens == 128 and d.judge_batch_size == 8
    assert _run_config(tmp_path, "eval:\n  temperature: 0\n").eval.decoding() == (0.0, 1)
    assert _run_config(tmp_path, "eval:\n  greedy: true\n  num_samples: 3\n").eval.decoding() == (0.0, 3)


def test_paper_preset_sets_the_papers_evaluation(tmp_path):
    ev = _run_config(tmp_path, "preset: paper\n").eval
    assert ev.greedy is True and ev.max_new_tokens == 512 and ev.decoding() == (0.0, 1)
    ev = _run_config(tmp_path, "eval:\n  max_new_tokens: 64\n  greedy: false\n", ["--preset", "paper"]).eval
    assert ev.greedy is False and ev.max_new_tokens == 64  # the section's keys sit over the preset
    ev = _run_config(tmp_path, "distill:\n  preset: paper\n").eval  # a stage's preset is that stage's only
    assert ev.greedy is False and ev.max_new_tokens == 256


@pytest.mark.parametrize("text, match", [
    ("eval:\n  judgee: /j\n", r"unknown config key 'eval.judgee' in .*run.yaml; known: .*judge"),
    ("eval:\n  greedy: maybe\n", r"'eval.greedy' in .*run.yaml must be bool"),
    ("eval:\n  baseline: nobody\n", r"'eval.baseline' in .*run.yaml must be one of \('base', 'teacher', 'student'\)"),
    ("eval:\n  judge_batch_size: 0\n", r"'eval.judge_batch_size' must be > 0"),
    ("eval:\n  ci_level: 1.5\n", r"'eval.ci_level' must be in \(0, 1\)"),
])
def test_eval_section_errors_name_the_key(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        _run_config(tmp_path, text)


def test_eval_flag_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"'eval.judge_max_new_tokens' \(command line\) must be int"):
        _run_config(tmp_path, "", ["--eval.judge_max_new_tokens", "many"])


def test_run_passes_the_eval_section_and_the_teacher_view(user, tmp_path, monkeypatch, capsys):
    """What ``copsd run`` hands to ``evaluate_models``: every eval key, and the teacher view of Stage 1."""
    import copsd.distill
    import copsd.eval
    import copsd.sft
    from copsd.cli import main

    calls = []
    monkeypatch.setattr(copsd.sft, "sft_teacher", lambda cfg: calls.append("sft"))
    monkeypatch.setattr(copsd.distill, "distill", lambda cfg: calls.append("distill"))
    monkeypatch.setattr(copsd.eval, "evaluate_models",
                        lambda models, files, out, **kw: calls.append((models, files, out, kw)))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model_name_or_path: {user['qwen']}\noutput_dir: {tmp_path / 'run'}\nconstitution: {user['constitution']}\n"
        f"dataset: {user['data']}\nteacher_template: \"{{constitution}}\\n\\nQ: {{query}}\"\n"
        "category_mode: extend\nconstitution_title: true\nbf16: true\nrefusal_detector: keyword\n"
        f"eval:\n  prompt_files: [{user['data']}]\n  greedy: true\n  max_new_tokens: 512\n  judge: {user['qwen']}\n"
        "  baseline: base\n  judge_max_new_tokens: 32\n  judge_batch_size: 2\n  bootstrap: 100\n")
    assert main(["run", "--config", str(cfg), "--eval.ci_level", "0.9"]) == 0
    assert calls[:2] == ["sft", "distill"]
    models, files, out, kw = calls[2]
    assert [m["name"] for m in models] == ["base", "teacher", "student"]
    assert models[1]["constitution"] == user["constitution"] and files == [user["data"]]
    assert kw["temperature"] == 0.0 and kw["num_samples"] == 1 and kw["max_new_tokens"] == 512
    assert kw["judge"] == user["qwen"] and kw["baseline"] == "base"
    assert kw["judge_max_new_tokens"] == 32 and kw["judge_batch_size"] == 2
    assert kw["n_boot"] == 100 and kw["ci_level"] == 0.9
    assert kw["teacher_template"] == "{constitution}\n\nQ: {query}"
    assert kw["category_mode"] == "extend" and kw["constitution_title"] is True
    assert kw["leak_constitutions"] == [user["constitution"]]
    import torch

    assert kw["dtype"] == torch.bfloat16  # eval.bf16 unset: as the stages


@pytest.mark.parametrize("eval_text, match", [
    ("  prompt_files: [{missing}]\n", r"eval.prompt_files: file not found: .*missing.jsonl"),
    ("  prompt_files: [{bad_category}]\n", r"bad.jsonl line 1: category 'fraud' is not defined in the constitution"),
    ("  prompt_files: [{data}]\n  judge: {missing_dir}\n", r"eval.judge: expected a local model directory"),
])
def test_run_checks_the_evaluation_before_stage_1(user, tmp_path, monkeypatch, capsys, eval_text, match):
    import re

    import copsd.sft
    from copsd.cli import main

    calls = []
    monkeypatch.setattr(copsd.sft, "sft_teacher", lambda cfg: calls.append("sft"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "How to forge a cheque?", "kind": "harmful",
                                                "category": "fraud"}])
    eval_text = eval_text.format(missing=tmp_path / "missing.jsonl", bad_category=bad, data=user["data"],
                                 missing_dir=tmp_path / "nojudge")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: {user['qwen']}\noutput_dir: {tmp_path / 'run'}\n"
                   f"constitution: {user['constitution']}\ndataset: {user['data']}\neval:\n{eval_text}")
    assert main(["run", "--config", str(cfg)]) == 2
    assert calls == []  # refused before Stage 1
    err = capsys.readouterr().err
    assert "the evaluation would fail after training" in err and re.search(match, err), err


@pytest.mark.slow  # about 20 s on 2 busy cores; the wiring is checked fast above
def test_copsd_run_evaluates_greedy_with_a_judge(user, tmp_path, capsys):
    """The whole command on the tiny model: greedy answers judged by a local chat model, win-rates vs base."""
    from copsd.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model_name_or_path: {user['qwen']}\noutput_dir: {tmp_path / 'run'}\nconstitution: {user['constitution']}\n"
        f"dataset: {user['data']}\nreport_to: [jsonl]\ndisable_tqdm: true\nbackend: reference\n"
        "max_completion_length: 4\nlearning_rate: 0.001\ncategory_mode: extend\n"
        "sft:\n  max_steps: 1\n  per_device_train_batch_size: 2\n"
        "distill:\n  max_steps: 1\n  num_generations: 2\n  per_device_train_batch_size: 4\n  teacher_mode: ema\n"
        f"eval:\n  prompt_files: [{user['data']}]\n  max_new_tokens: 4\n  greedy: true\n  judge: {user['qwen']}\n"
        "  judge_max_new_tokens: 4\n  bootstrap: 50\n")
    assert main(["run", "--config", str(cfg)]) == 0
    assert "win_rate_vs_base" in capsys.readouterr().out
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    s = report["settings"]
    assert s["decoding"] == "greedy" and s["num_samples"] == 1 and s["max_new_tokens"] == 4
    assert s["judge"]["judge"] == user["qwen"] and s["judge"]["baseline"] == "base"
    assert s["teacher_view"]["category_mode"] == "extend"
    models = {m["name"]: m for m in report["models"]}
    for name in ("teacher", "student"):
        pw = models[name]["judge"]["pairwise"]
        assert pw["n_pairs"] + pw["pairs_without_verdict"] == len(LABELLED)
    assert "pairwise" not in models["base"]["judge"]
    assert models["teacher"]["category_mode"] == "extend"
    # the teacher is evaluated in the view it was trained in (the hash its Stage 1 recorded)
    assert models["teacher"]["trained_constitution_sha256"] == models["teacher"]["constitution_sha256"]


@pytest.mark.slow  # two gloo processes through both stages (about a minute on 2 busy cores)
def test_multi_process_run_evaluates_once_on_the_main_process(user, tmp_path):
    """Under torchrun the stages train on every process, then only the main process evaluates (the others
    close the process group and exit): one table, one report, every process exits 0."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model_name_or_path: {user['qwen']}\noutput_dir: {tmp_path / 'run'}\nconstitution: {user['constitution']}\n"
        f"dataset: {user['data']}\nreport_to: [jsonl]\ndisable_tqdm: true\nbackend: reference\n"
        "max_completion_length: 4\nlearning_rate: 0.001\n"
        "sft:\n  max_steps: 1\n  per_device_train_batch_size: 1\n"
        "distill:\n  max_steps: 1\n  num_generations: 2\n  per_device_train_batch_size: 2\n  num_mini_batches: 1\n"
        f"  teacher_mode: initial\neval:\n  prompt_files: [{user['data']}]\n  max_new_tokens: 3\n  greedy: true\n")
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(29600 + os.getpid() % 1000), "-m", "copsd.cli", "run", "--config", str(cfg)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("copsd run: teacher in") == 1, r.stdout
    assert r.stdout.count("bootstrap intervals") == 1
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["base", "teacher", "student"]


# --------------------------------------------------------------------------- copsd eval's teacher view

def _prompts_seen(monkeypatch):
    """Record the prompt ids every generation call gets (the rendered views), then generate as usual."""
    import copsd.rollout

    seen, real = [], copsd.rollout.generate

    def spy(model, prompt_ids, **kw):
        seen.extend(list(p) for p in prompt_ids)
        return real(model, prompt_ids, **kw)

    monkeypatch.setattr(copsd.rollout, "generate", spy)
    return seen


@pytest.mark.parametrize("category_mode, title", [("extend", True), ("extend", False), ("replace", True)])
def test_eval_teacher_view_follows_category_mode_and_title(user, tmp_path, monkeypatch, category_mode, title):
    """The teacher view that ``copsd eval`` renders is distillation's: the row's category text extends the
    default text under ``category_mode: extend`` and the ``# title`` line is sent with ``constitution_title``."""
    from transformers import AutoTokenizer

    from copsd import eval as ev
    from copsd.constitution import load_constitution, render_ids, teacher_messages
    from copsd.data import load_prompt_rows

    template = "{constitution}\n\nRequest: {query}"
    seen = _prompts_seen(monkeypatch)
    report = ev.evaluate_models([{"name": "teacher", "path": user["qwen"], "constitution": user["constitution"]}],
                                [user["data"]], str(tmp_path), num_samples=1, max_new_tokens=2, temperature=0.0,
                                teacher_template=template, category_mode=category_mode, constitution_title=title,
                                progress=False, plots=False, print_table=False, n_boot=10)
    tok = AutoTokenizer.from_pretrained(user["qwen"])
    c = load_constitution(user["constitution"], category_mode=category_mode, include_title=title)
    plain = load_constitution(user["constitution"])
    rows = load_prompt_rows(user["data"])
    want = [render_ids(tok, teacher_messages(r.messages, c.text_for(r.category), template), add_generation_prompt=True)
            for r in rows]
    old = [render_ids(tok, teacher_messages(r.messages, plain.text_for(r.category), template),
                      add_generation_prompt=True) for r in rows]
    assert seen[:len(rows)] == want
    assert want != old  # the settings change what the teacher reads, so the check above can fail
    plain_row, harmful = tok.decode(want[0]), tok.decode(want[2])  # no category; category 'violence'
    assert ("# My house rules" in plain_row) == title and "Be helpful and honest" in plain_row
    # the title heads the default text, so a category row sees it only when its text extends the default
    assert ("# My house rules" in harmful) == (title and category_mode == "extend")
    assert ("Be helpful and honest" in harmful) == (category_mode == "extend")
    assert "Never give instructions that help hurt a person." in harmful
    m = report["models"][0]
    assert (m["category_mode"], m["constitution_title"]) == (category_mode, title)
    assert m["constitution_sha256"] == c.sha256
    assert report["settings"]["teacher_view"] == {"template": template, "category_mode": category_mode,
                                                  "constitution_title": title}


def test_eval_cli_teacher_view_flags(user, tmp_path, monkeypatch):
    from copsd.cli import main

    seen = _prompts_seen(monkeypatch)
    out = tmp_path / "ev"
    assert main(["eval", "--model", f"teacher={user['qwen']}", "--constitution", f"teacher={user['constitution']}",
                 "--prompts", user["data"], "--output_dir", str(out), "--greedy", "--max_new_tokens", "2",
                 "--category_mode", "extend", "--constitution_title", "true", "--teacher_template",
                 "{constitution}\n\n{query}", "--bootstrap", "10", "--no_plots", "--no_progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["teacher_view"] == {"template": "{constitution}\n\n{query}", "category_mode": "extend",
                                                  "constitution_title": True}
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(user["qwen"]).decode(seen[2])
    assert "# My house rules" in text and "Be helpful and honest" in text and "Never give instructions" in text


def test_eval_teacher_view_errors(user, tmp_path, monkeypatch):
    from copsd import eval as ev

    seen = _prompts_seen(monkeypatch)

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "How to forge a cheque?", "kind": "harmful",
                                                "category": "fraud"}])
    models = [{"name": "base", "path": user["qwen"]},
              {"name": "teacher", "path": user["qwen"], "constitution": user["constitution"]}]
    kw = dict(num_samples=1, max_new_tokens=2, progress=False, plots=False, print_table=False)
    with pytest.raises(ValueError, match="category_mode: expected one of"):
        ev.evaluate_models(models, [user["data"]], str(tmp_path / "a"), category_mode="append", **kw)
    with pytest.raises(ValueError, match="teacher_template: must contain"):
        ev.evaluate_models(models, [user["data"]], str(tmp_path / "b"), teacher_template="{query}", **kw)
    with pytest.raises(ValueError, match=r"bad.jsonl line 1: model 'teacher': category 'fraud' is not defined"):
        ev.evaluate_models(models, [bad], str(tmp_path / "c"), **kw)
    assert seen == []  # found before the base model generated


def test_eval_refuses_a_bad_judge_before_generating(user, tmp_path, monkeypatch):
    """A judge directory without weights' config (or a tokenizer chat template) fails at once, not after every
    model has answered every prompt."""
    import shutil

    from copsd import eval as ev

    seen = _prompts_seen(monkeypatch)
    no_template = tmp_path / "no_template"
    shutil.copytree(user["qwen"], no_template)
    cfg = json.loads((no_template / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in ("chat_template.jinja", "chat_template.json"):
        if (no_template / f).exists():
            (no_template / f).unlink()
    kw = dict(num_samples=1, max_new_tokens=2, progress=False, plots=False, print_table=False)
    with pytest.raises(ValueError, match="has no chat template"):
        ev.evaluate_models([{"name": "base", "path": user["qwen"]}], [user["data"]], str(tmp_path / "a"),
                           judge=str(no_template), **kw)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="judge: cannot load"):
        ev.evaluate_models([{"name": "base", "path": user["qwen"]}], [user["data"]], str(tmp_path / "b"),
                           judge=str(empty), **kw)
    assert seen == []


def test_judge_query_tells_of_unseen_images():
    from copsd.judge import IMAGES_NOTE, judge_query

    assert judge_query("Describe it.") == "Describe it."
    assert judge_query("Describe it.", 0) == "Describe it."
    q = judge_query("Describe {it}.", 2)
    assert q.startswith("Describe {it}.\n") and "2 image(s)" in q and "cannot see" in q
    assert IMAGES_NOTE.replace("{n}", "2") in q


def test_hybrid_warns_about_judged_rows_with_images(caplog):
    from types import SimpleNamespace

    from copsd.hybrid import warn_image_rows

    rows = [SimpleNamespace(images=["a.png"]), SimpleNamespace(images=None), SimpleNamespace(images=["b.png"])]
    caplog.set_level(logging.WARNING, logger="copsd")
    assert warn_image_rows(rows, ["token", "judge", "token"]) == 0 and not caplog.records
    assert warn_image_rows(rows, ["judge", "judge", "token"]) == 1
    assert "1 of the 2 rows routed to the judge have images" in caplog.text


# --------------------------------------------------------------------------- the judge and images

@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    from test_vlm_data import image_dataset
    from vlm_models import save_vlm_dir

    root = tmp_path_factory.mktemp("vl_judge")
    return {"model": save_vlm_dir(root / "qwen2_5_vl", "qwen2_5_vl"), "data": image_dataset(root / "data")}


def test_eval_judge_is_told_of_unseen_images(user, vl, tmp_path, caplog):
    """Prompts with images: each judge prompt of such a row says that images came with the request and cannot
    be seen; the count is a warning and a report field."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from copsd import eval as ev
    from copsd.data import load_prompt_rows, message_text
    from copsd.judge import IMAGES_NOTE, Judge

    class Recording(Judge):
        def generate(self, prompts):
            self.seen = getattr(self, "seen", []) + list(prompts)
            return ["Winner: A" if "[Reply A]" in p else "Score: 5" for p in prompts]

    judge = Recording(AutoModelForCausalLM.from_pretrained(user["qwen"]), AutoTokenizer.from_pretrained(user["qwen"]))
    caplog.set_level(logging.WARNING, logger="copsd")
    report = ev.evaluate_models([{"name": "a", "path": vl["model"]}, {"name": "b", "path": vl["model"]}],
                                [vl["data"]], str(tmp_path), num_samples=1, max_new_tokens=2, temperature=0.0,
                                judge=judge, progress=False, plots=False, print_table=False, n_boot=10)
    rows = load_prompt_rows(vl["data"])
    n_img = sum(bool(r.images) for r in rows)
    assert 0 < n_img < len(rows)
    assert report["settings"]["judge"]["prompts_with_images_judged_on_text"] == n_img
    assert f"{n_img} of {len(rows)} prompts have images" in caplog.text
    note = IMAGES_NOTE.split("{n}")[1]
    for r in rows:
        query = message_text(r.messages[-1]["content"])
        asked = [p for p in judge.seen if f"[Request]\n{query}\n" in p]
        assert len(asked) == 4 and all((note in p) == bool(r.images) for p in asked), query
    # 2 pointwise verdicts (one per model) + 2 pairwise (both orders) per prompt
    assert len(judge.seen) == 4 * len(rows)


@pytest.mark.slow  # loads a vision-language model as the judge and judges two models (5-15 s)
def test_a_vision_language_model_can_judge(vl, tmp_path):
    """``--judge`` may name a vision-language model directory (it judges text, see above)."""
    from copsd import eval as ev
    from copsd.judge import Judge

    judge = Judge.from_pretrained(vl["model"], device="cpu", max_new_tokens=3)
    assert judge.generate(["Is this safe?"])[0] is not None
    report = ev.evaluate_models([{"name": "a", "path": vl["model"]}, {"name": "b", "path": vl["model"]}],
                                [vl["data"]], str(tmp_path), num_samples=1, max_new_tokens=2, temperature=0.0,
                                judge=vl["model"], judge_max_new_tokens=3, progress=False, plots=False,
                                print_table=False, n_boot=10)
    pw = report["models"][1]["judge"]["pairwise"]
    assert pw["n_pairs"] + pw["pairs_without_verdict"] == report["n_prompts"]


def test_eval_warns_when_the_teacher_view_differs_from_training(user, tmp_path, caplog):
    """A copsd-trained model records its constitution view (``constitution.json``); evaluating it with another
    category mode or title setting is a warning naming the flags, and the recorded hash goes into the report."""
    import shutil

    from copsd import eval as ev
    from copsd.constitution import load_constitution

    model = tmp_path / "teacher"
    shutil.copytree(user["qwen"], model)
    trained = load_constitution(user["constitution"], category_mode="extend", include_title=True)
    (model / "constitution.json").write_text(json.dumps(trained.to_dict()))
    models = [{"name": "teacher", "path": str(model), "constitution": user["constitution"]}]
    kw = dict(num_samples=1, max_new_tokens=2, temperature=0.0, progress=False, plots=False, print_table=False,
              n_boot=10)
    caplog.set_level(logging.WARNING, logger="copsd")
    report = ev.evaluate_models(models, [user["data"]], str(tmp_path / "a"), **kw)
    assert "was trained with constitution" in caplog.text and "--category_mode" in caplog.text
    assert report["models"][0]["trained_constitution_sha256"] == trained.sha256
    caplog.clear()
    report = ev.evaluate_models(models, [user["data"]], str(tmp_path / "b"), category_mode="extend",
                                constitution_title=True, **kw)
    assert "was trained with constitution" not in caplog.text
    assert report["models"][0]["constitution_sha256"] == trained.sha256


def test_judge_prompt_limit_of_a_vision_language_model(user):
    """A VLM keeps ``max_position_embeddings`` in its text config: the judge's prompt limit comes from there
    (it was unlimited, so an over-long judge prompt could run past the judge's context)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer, Qwen2_5_VLConfig

    from copsd.judge import Judge

    tok = AutoTokenizer.from_pretrained(user["qwen"])
    config = Qwen2_5_VLConfig(text_config={"max_position_embeddings": 300})
    assert getattr(config, "max_position_embeddings", None) is None  # the case being tested
    assert Judge(SimpleNamespace(config=config), tok, max_new_tokens=20).max_prompt_tokens == 280
    assert Judge(SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64)), tok,
                 max_new_tokens=4).max_prompt_tokens == 60
