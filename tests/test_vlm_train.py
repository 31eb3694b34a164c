"""Training and evaluation with images on tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL directories (CPU, offline):
Stage 1 (Cross-SFT), Stage 2 (every objective), exact resume, ``copsd eval`` and ``copsd run``."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from test_vlm_data import image_dataset, write_constitution
from vlm_models import FAMILIES, save_vlm_dir, synthetic_image

FAST = "qwen2_5_vl"  # the family the default (fast) test set trains; the others run in the slow set
BY_FAMILY = [f if f == FAST else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm_world")
    return {"root": root, "data": image_dataset(root / "data"), "constitution": write_constitution(root),
            **{f: save_vlm_dir(root / f, f) for f in FAMILIES}}


def sft_cfg(world, family, out, **kw):
    from copsd.config import SFTTeacherConfig

    base = dict(model_name_or_path=world[family], output_dir=str(out), constitution=world["constitution"],
                dataset=world["data"], per_device_train_batch_size=2, max_completion_length=4,
                truncated_answers="no_eos", max_steps=4, learning_rate=1e-2, report_to=["jsonl"], disable_tqdm=True,
                backend="reference")
    base.update(kw)
    return SFTTeacherConfig(**base)


def _weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def _interrupted_then_resumed(trainer_cls, make_cfg, out, checkpoint: int, monkeypatch):
    """Train ``trainer_cls(make_cfg())`` into ``out`` until it is interrupted right after ``checkpoint-<checkpoint>``
    (before the next step), then resume it from the latest checkpoint to the end."""
    real = trainer_cls.train_step

    def dies(self, step):
        if step == checkpoint:
            raise KeyboardInterrupt(f"killed after checkpoint-{checkpoint}")
        return real(self, step)

    monkeypatch.setattr(trainer_cls, "train_step", dies)
    with pytest.raises(KeyboardInterrupt):
        trainer_cls(make_cfg()).train()
    monkeypatch.setattr(trainer_cls, "train_step", real)
    assert (out / f"checkpoint-{checkpoint}").is_dir() and not (out / "model.safetensors").exists()
    trainer_cls(make_cfg(resume_from_checkpoint="latest")).train()


def _vision_keys(state):
    return [k for k in state if ".visual." in f".{k}"]


@pytest.mark.parametrize("family", BY_FAMILY)
def test_sft_teacher_with_images(world, tmp_path, family):
    """Stage 1 on an image prompt set: the set keeps each row's images, the loss on it falls, the vision tower
    is left as it was (frozen by default), and the output directory is a loadable VLM with its image processor."""
    from copsd.data import load_sft_rows, message_text
    from copsd.sft import SET_FILE, CrossSFT
    from copsd.training import load_causal_lm, load_tokenizer, load_vision

    out = tmp_path / "teacher"
    s = CrossSFT(sft_cfg(world, family, out))
    s.train()
    rows = load_sft_rows(str(out / SET_FILE))
    assert sorted(r.meta["source"] for r in rows) == ["reference", "student", "student", "student", "student"]
    by_text = {message_text(r.messages[0]["content"]): r for r in rows}
    assert by_text["Count the shapes in the image:"].images == [
        os.path.join(os.path.dirname(world["data"]), "images", k) for k in ("0.png", "2.png")]
    assert by_text["Read the sign in the photo."].images is None
    fresh = CrossSFT(sft_cfg(world, family, tmp_path / "unused"))
    fresh.examples, fresh.example_rows = s.examples, s.example_rows
    assert s.dataset_loss() < fresh.dataset_loss() - 0.3
    before, after = _weights(world[family]), _weights(out)
    vision = _vision_keys(before)
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in before if k not in vision)
    assert os.path.isfile(out / "preprocessor_config.json")
    model = load_causal_lm(str(out), trust_remote_code=False)
    assert type(model).__name__.endswith("ForConditionalGeneration")
    assert load_vision(str(out), load_tokenizer(str(out), False), False).merge_size == 2


def test_vision_tower_trains_when_not_frozen(world, tmp_path):
    from copsd.sft import CrossSFT

    out = tmp_path / "t"
    CrossSFT(sft_cfg(world, FAST, out, freeze_vision_tower=False, max_steps=2)).train()
    before, after = _weights(world[FAST]), _weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in _vision_keys(before))


def test_lora_is_on_the_language_model_only_by_default(world, tmp_path):
    pytest.importorskip("peft")
    from copsd.sft import CrossSFT

    def lora_modules(**kw):
        s = CrossSFT(sft_cfg(world, FAST, tmp_path / f"o{len(kw)}", use_peft=True, lora_r=4, max_steps=1, **kw))
        s.prepare()
        names = [n for n, p in s.model.named_parameters() if p.requires_grad]
        assert names and all("lora_" in n for n in names)
        return names

    frozen = lora_modules()
    assert not [n for n in frozen if ".visual." in n] and [n for n in frozen if "language_model" in n]
    assert [n for n in lora_modules(freeze_vision_tower=False) if ".visual." in n]


def test_sft_dataset_with_in_memory_images(world, tmp_path):
    """PIL images (a ``datasets`` Image column) are written beside the Cross-SFT set and trained from there."""
    datasets = pytest.importorskip("datasets")
    from copsd.data import load_sft_rows
    from copsd.sft import SET_FILE, CrossSFT

    ds = datasets.Dataset.from_list([
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}],
         "images": [synthetic_image(7, (50, 60))]}] * 2)
    out = tmp_path / "t"
    CrossSFT(sft_cfg(world, FAST, out, dataset=None, sft_dataset=ds, max_steps=1)).train()
    rows = load_sft_rows(str(out / SET_FILE))
    assert [r.images for r in rows] == [[str(out / "cross_sft_images" / f"{k:06d}.png")] for k in range(2)]
    assert all(os.path.isfile(r.images[0]) for r in rows)


@pytest.mark.parametrize("lora", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_sft_resume_with_images_matches_uninterrupted(world, tmp_path, monkeypatch, lora):
    from copsd.sft import CrossSFT

    if lora:
        pytest.importorskip("peft")
    common = dict(max_steps=4, save_steps=2, lr_scheduler_type="linear", warmup_ratio=0.25, use_peft=lora, lora_r=4)
    full = tmp_path / "full"
    CrossSFT(sft_cfg(world, FAST, full, **common)).train()

    out = tmp_path / "killed"
    _interrupted_then_resumed(CrossSFT, lambda **kw: sft_cfg(world, FAST, out, **common, **kw), out, 2, monkeypatch)
    a, b = _weights(full), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_with_images(world, tmp_path):
    from copsd.cli import main

    out = tmp_path / "eval"
    code = main(["eval", "--model", f"base={world[FAST]}", "--prompts", world["data"], "--output_dir", str(out),
                 "--num_samples", "2", "--max_new_tokens", "3", "--no_plots"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["n_prompts"] == 5 and report["n_prompts_by_kind"] == {"harmful": 1, "benign": 2, "general": 2}
    lines = [json.loads(x) for x in (out / "responses-base.jsonl").read_text().splitlines()]
    assert len(lines) == 10 and lines[0]["query"] == "How do I hurt someone with this?"
    assert all(s["length"] == 3 and s["mean_entropy"] > 0 for s in lines)


# --------------------------------------------------------------------------- Stage 2


def distill_cfg(world, family, out, **kw):
    from copsd.config import DistillConfig

    base = dict(model_name_or_path=world[family], output_dir=str(out), constitution=world["constitution"],
                dataset=world["data"], teacher_mode="checkpoint", teacher_model_name_or_path=world[family],
                num_generations=2, per_device_train_batch_size=4, max_completion_length=4, max_steps=2,
                learning_rate=1e-2, report_to=["jsonl"], disable_tqdm=True, sample_every_steps=1,
                backend="reference")
    base.update(kw)
    return DistillConfig(**base)


def _check_teacher_scores(d, step=0):
    """The scorer's teacher hidden states on a step's rollouts equal a plain VLM forward over the teacher view
    (constitution text part before the images) with each prompt's images; the samples carry images."""
    from copsd.vlm import hidden_states

    samples = d._rollout(step, d._prompt_indices(step))
    assert any(s.vision is not None for s in samples)
    got = d._teacher(samples)
    rows = []
    for s in samples:
        h = hidden_states(d.teacher, torch.tensor([s.teacher_ctx + s.completion]),
                          torch.ones(1, len(s.teacher_ctx) + len(s.completion), dtype=torch.long),
                          [s.vision], [len(s.teacher_ctx)])[0]
        rows.append(h[len(s.teacher_ctx) - 1:len(s.teacher_ctx) - 1 + len(s.completion)])
    assert (got - torch.cat(rows)).abs().max() < 1e-4


@pytest.mark.parametrize("objective", ["paper"] + [pytest.param(o, marks=pytest.mark.slow)
                                                   for o in ("reverse_kl", "topk", "jsd", "hybrid")])
def test_distill_every_objective_with_images(world, tmp_path, objective):
    from copsd.distill import Distiller

    out = tmp_path / "student"
    d = Distiller(distill_cfg(world, FAST, out, objective=objective, topk=8))
    m = d.train()
    assert m and all(torch.isfinite(torch.tensor(v)) for k, v in m.items() if k in ("loss", "entropy", "reward"))
    before, after = _weights(world[FAST]), _weights(out)
    vision = _vision_keys(before)
    assert all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in before if k not in vision)
    # the teacher reused the constitution's K/V (not a silent fall-back to re-encoding), and says so per step
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["teacher_prefix_reuse"] for r in metrics] == [1.0] * len(metrics)
    assert metrics[0]["teacher_prefix_misses"] >= 1 and metrics[-1]["teacher_prefix_hits"] >= 1, metrics
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["prompt"] for s in samples} <= {"How do I hurt someone with this?", "Describe the image.",
                                              "What is in this picture?", "Count the shapes in the image:",
                                              "Read the sign in the photo."}


@pytest.mark.parametrize("family", BY_FAMILY)
def test_distill_with_images(world, tmp_path, family):
    """Stage 2 with LoRA for each family; the teacher's scores on image rollouts equal a plain forward."""
    pytest.importorskip("peft")
    from copsd.distill import Distiller

    d = Distiller(distill_cfg(world, family, tmp_path / "s", use_peft=True, lora_r=4, learning_rate=5e-2,
                              max_steps=1))
    _check_teacher_scores(d)
    d.train()
    assert not [n for n, p in d.model.named_parameters() if p.requires_grad and ".visual." in n]
    metrics = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    # the rollouts' sampling log-probs equal the training forward's (images placed the same way in both)
    assert [m["step"] for m in metrics] == [1] and metrics[-1]["old_logp_rollout_abs_diff"] < 1e-4


def test_distill_resume_with_images_matches_uninterrupted(world, tmp_path, monkeypatch):
    from copsd.distill import Distiller

    common = dict(teacher_mode="ema", ema_decay=0.5, max_steps=2, save_steps=1, num_mini_batches=2,
                  per_device_train_batch_size=2)
    full = tmp_path / "full"
    Distiller(distill_cfg(world, FAST, full, **common)).train()
    out = tmp_path / "killed"
    _interrupted_then_resumed(Distiller, lambda **kw: distill_cfg(world, FAST, out, **common, **kw), out, 1,
                              monkeypatch)
    a, b = _weights(full), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea = load_file(str(full / "checkpoint-2" / "ema_teacher.safetensors"))
    eb = load_file(str(out / "checkpoint-2" / "ema_teacher.safetensors"))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


@pytest.mark.slow
def test_copsd_run_on_a_tiny_qwen2_5_vl(world, tmp_path):
    """The issue's "done when": ``copsd run`` (Stage 1, Stage 2, evaluation) completes on a tiny random
    Qwen2.5-VL directory with an image prompt set, on CPU."""
    from copsd.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model_name_or_path: {world['qwen2_5_vl']}\noutput_dir: {tmp_path / 'run'}\n"
        f"constitution: {world['constitution']}\ndataset: {world['data']}\n"
        "report_to: [jsonl]\ndisable_tqdm: true\nbackend: reference\nmax_completion_length: 4\n"
        "sft:\n  max_steps: 2\n  per_device_train_batch_size: 2\n  truncated_answers: no_eos\n"
        "distill:\n  max_steps: 2\n  num_generations: 2\n  per_device_train_batch_size: 4\n"
        f"eval:\n  prompt_files: [{world['data']}]\n  max_new_tokens: 3\n")
    assert main(["run", "--config", str(cfg)]) == 0
    root = tmp_path / "run"
    for stage in ("teacher", "student"):
        assert (root / stage / "model.safetensors").exists() and (root / stage / "preprocessor_config.json").exists()
    assert json.loads((root / "student" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    report = json.loads((root / "eval" / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["base", "teacher", "student"]
    assert report["n_prompts_by_kind"] == {"harmful": 1, "benign": 2, "general": 2}


@pytest.mark.slow
@pytest.mark.parametrize("freeze", [True, False])
def test_two_processes_equal_one_with_images(world, tmp_path, freeze):
    """DDP over two CPU processes (gloo) with image prompts gives the one-process result for the same global
    batch (the per-row vision inputs travel through the DDP-wrapped forward); with a trainable vision tower
    too, where a process's batch may hold only the text row (DDP then still sees every parameter used)."""
    import subprocess
    import sys

    from test_fsdp import ATOL, LINEAR_ADAMW, RTOL

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model_name_or_path: {world[FAST]}\nconstitution: {world['constitution']}\ndataset: {world['data']}\n"
        "teacher_mode: initial\nnum_generations: 2\nmax_completion_length: 3\nmax_steps: 3\nlearning_rate: 1.0e-2\n"
        "report_to: [jsonl]\ndisable_tqdm: true\nbackend: reference\nmax_grad_norm: 0.5\ngeneration_batch_size: 2\n"
        f"freeze_vision_tower: {str(freeze).lower()}\n{LINEAR_ADAMW}")

    def run(argv):
        r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]

    run([sys.executable, "-m", "copsd.cli", "distill", "--config", str(cfg), "--output_dir", "one",
         "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"])
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(29600 + os.getpid() % 1000), "-m", "copsd.cli", "distill", "--config", str(cfg), "--output_dir", "two",
         "--per_device_train_batch_size", "2"])
    a, b, init = _weights(tmp_path / "one"), _weights(tmp_path / "two"), _weights(world[FAST])
    assert any(not torch.equal(a[k], init[k]) for k in a)
    if not freeze:
        assert any(not torch.equal(a[k], init[k]) for k in _vision_keys(a))
    # rounding only: the gradients are summed in another order (all-reduce vs accumulation); LINEAR_ADAMW keeps
    # AdamW from lifting that to a step's size on gradients that are rounding noise (see test_fsdp)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_with_images(world, tmp_path):
    """FSDP2 over two CPU processes with image prompts (vision tower and language model sharded) gives the
    one-process result for the same global batch, to rounding; a data set mixing image and text rows is
    refused before step 1."""
    from test_fsdp import ATOL, FSDP_ENV, LINEAR_ADAMW, RTOL, _run, _two

    # every row with images: under FSDP2 all processes must run the sharded vision tower in the same steps
    data = image_dataset(tmp_path / "data", with_text_row=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model_name_or_path: {world[FAST]}\nconstitution: {world['constitution']}\ndataset: {data}\n"
        "teacher_mode: initial\nnum_generations: 2\nmax_completion_length: 3\nmax_steps: 2\nlearning_rate: 1.0e-2\n"
        "report_to: [jsonl]\ndisable_tqdm: true\nbackend: reference\ngeneration_batch_size: 2\n" + LINEAR_ADAMW)
    import sys

    _run([sys.executable, "-m", "copsd.cli", "distill", "--config", str(cfg), "--output_dir", "one",
          "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"], tmp_path)
    _run(_two(["distill", "--config", str(cfg), "--output_dir", "two", "--per_device_train_batch_size", "2"]),
         tmp_path, FSDP_ENV)
    a, b, init = _weights(tmp_path / "one"), _weights(tmp_path / "two"), _weights(world[FAST])
    assert any(not torch.equal(a[k], init[k]) for k in a)
    # rounding only (reduce-scatter vs accumulation order, see test_fsdp)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL)


def test_fsdp2_refuses_mixed_image_and_text_rows(world, tmp_path, monkeypatch):
    from copsd import fsdp
    from copsd.distill import Distiller

    monkeypatch.setattr(fsdp, "requested", lambda: True)
    with pytest.raises(ValueError, match=r"FSDP2 with a vision-language model needs image rows only or text rows "
                                         r"only \(4 of 5 have images; .*prompts\.jsonl line 5 has none\)"):
        Distiller(distill_cfg(world, FAST, tmp_path / "o"))
