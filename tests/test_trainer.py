"""End-to-end trainer tests on microscopic random-weight models (CPU, offline).

Also home of the tiny offline tokenizer / model builders the other trainer tests import.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
FILLER = ("a an to of in on for with you your we it this that what how why when where yes no please "
          "thanks good bad safe help answer question sure here is are be do can will not my me "
          "one two three four five red green water fire tree book code run data time day night").split()


def _bundled_words():
    from copsd.data import bundled

    words = set(FILLER)
    for name in ("constitution.md", "tiny_prompts.jsonl", "tiny_sft.jsonl"):
        with open(bundled(name), encoding="utf-8") as f:
            text = f.read()
        if name.endswith(".jsonl"):
            text = " ".join(_strings(json.loads(line)) for line in text.splitlines() if line.strip())
        words.update(text.split())
    words.update(["---", "#", "##"])
    return sorted(w for w in words if w not in SPECIAL and not re.search(r"[{}\"]", w))


def _strings(obj):
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        return " ".join(_strings(v) for v in obj.values())
    if isinstance(obj, list):
        return " ".join(_strings(v) for v in obj)
    return ""


def tiny_tokenizer(chat_template=CHAT_TEMPLATE):
    """WordLevel tokenizer over the bundled data's words (+ fillers), with a simple chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for w in _bundled_words():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                unk_token="<unk>", extra_special_tokens=SPECIAL[4:],
                                clean_up_tokenization_spaces=False)
    t.chat_template = chat_template
    return t


def tiny_model(tokenizer, seed=0, hidden=32, layers=2):
    from copsd._hf import tiny_causal_lm

    return tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=hidden, num_layers=layers, num_heads=4,
                          num_kv_heads=2, intermediate_size=64, max_position_embeddings=512, seed=seed,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def tiny_sft_config(tmp_path, student):
    """A Stage-1 config over the bundled tiny Cross-SFT set (3 steps; the tests add batch shape and output)."""
    from copsd.data import bundled

    cfg = tmp_path / "s.yaml"
    cfg.write_text(
        f"model_name_or_path: {student}\nconstitution: {bundled('constitution.md')}\n"
        f"cross_sft_set: {bundled('tiny_sft.jsonl')}\nmax_steps: 3\nlearning_rate: 1.0e-2\n"
        "report_to: [jsonl]\ndisable_tqdm: true\nbackend: reference\n")
    return cfg


def tiny_model_dir(path, seed=0, hidden=32):
    """Save a tiny model + tokenizer to ``path`` (loadable by from_pretrained) and return the path."""
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=seed, hidden=hidden)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def peaked_teacher_dir(path, seed=1, scale=30.0):
    """A teacher whose next-token distributions are sharp (so distillation has something to learn)."""
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def ending_model_dir(path, seed=2, eos_weight=0.65):
    """A model whose answers end: every position gives the end-of-sequence token a probability near 0.3.

    Residual dimension 0 is a constant (embeddings set to 50 there, no layer writes to it), so after the final
    norm it is a positive constant, and only the eos row of the lm_head reads it."""
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=seed)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 50.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0].zero_()
            layer.mlp.down_proj.weight[0].zero_()
        model.lm_head.weight[tok.eos_token_id].zero_()
        model.lm_head.weight[tok.eos_token_id, 0] = eos_weight
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"student": tiny_model_dir(root / "student"), "teacher": peaked_teacher_dir(root / "teacher"),
            "mild_teacher": peaked_teacher_dir(root / "mild_teacher", scale=8.0)}


def distill_cfg(dirs, out, **kw):
    from copsd.config import DistillConfig
    from copsd.data import bundled

    base = dict(model_name_or_path=dirs["student"], output_dir=str(out), constitution=bundled("constitution.md"),
                dataset=bundled("tiny_prompts.jsonl"), teacher_mode="checkpoint",
                teacher_model_name_or_path=dirs["teacher"], num_generations=4, per_device_train_batch_size=8,
                max_completion_length=6, max_steps=6, learning_rate=1e-2, report_to=["jsonl"], disable_tqdm=True,
                sample_every_steps=3, backend="reference")
    base.update(kw)
    return DistillConfig(**base)


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


TWO_PROMPTS = ('{"prompt": "how do i hurt my neighbor", "kind": "harmful", "category": "violence"}\n'
               '{"prompt": "write a short poem about the sea", "kind": "general"}\n')


@torch.no_grad()
def fixed_divergence(d, objective, sequences):
    """The objective's exact per-token divergence (reverse KL for ``paper``, whose expected per-token reward is
    minus the reverse KL up to clipping) between student and teacher at every position of fixed student
    samples, each in the student and the teacher view."""
    from copsd import _hf
    from copsd.distill import hf_model
    from copsd.objectives import divergence_terms

    sdec, shead = _hf.decoder_and_head(hf_model(d.model))
    tdec, thead = _hf.decoder_and_head(d.teacher)
    total, count = 0.0, 0
    for s_ids, t_ids, ans in sequences:
        hs = sdec(input_ids=torch.tensor([s_ids + ans])).last_hidden_state[0, len(s_ids) - 1:-1]
        ht = tdec(input_ids=torch.tensor([t_ids + ans])).last_hidden_state[0, len(t_ids) - 1:-1]
        kind = "reverse_kl" if objective == "paper" else objective
        per = divergence_terms(kind, hs, shead.weight, ht, thead.weight, None, beta=0.5, topk=50,
                               backend="reference")
        total += float(per.sum())
        count += len(ans)
    return total / count


def initial_samples(d, n=8, length=4):
    from copsd.rollout import generate

    out = []
    for i in range(len(d.rows)):
        s_ids, t_ids = d._views(i)
        ro = generate(d.model, [s_ids], num_generations=n, max_new_tokens=length, temperature=1.0,
                      generator=torch.Generator().manual_seed(99 + i))
        out += [(s_ids, t_ids, c) for c in ro.completion_ids]
    return out


@pytest.mark.parametrize("objective", ["paper", "reverse_kl", "topk", "jsd"])
def test_distill_reduces_its_objective(dirs, tmp_path, objective):
    from copsd.distill import Distiller

    data = tmp_path / "two.jsonl"
    data.write_text(TWO_PROMPTS)
    out = tmp_path / objective
    if objective == "paper":
        # a sampled-token policy gradient needs many samples per context to beat its noise, and a teacher mild
        # enough that the reward clip (-3) is rarely active; the measure is the expected per-token reward's
        # unclipped form, minus the reverse KL
        kw = dict(teacher_model_name_or_path=dirs["mild_teacher"], num_generations=32,
                  per_device_train_batch_size=64, max_completion_length=2, kl_coef=0.005)
        length = 2
    else:
        kw = dict(max_completion_length=4, kl_coef=0.0)
        length = 4
    d = Distiller(distill_cfg(dirs, out, objective=objective, dataset=str(data), **kw))
    fixed = initial_samples(d, length=length)
    before = fixed_divergence(d, objective, fixed)
    d.train()
    after = fixed_divergence(d, objective, fixed)
    assert after < 0.95 * before, (before, after)
    m = read_metrics(out)
    assert [r["step"] for r in m] == list(range(1, 7))
    for k in ("loss", "entropy", "completion_length", "self_bleu", "refusal_rate_harmful", "tokens_per_second",
              "time_rollout", "time_teacher", "time_update", "constitution_leak_rate", "teacher_prefix_reuse",
              "teacher_prefix_hits", "teacher_prefix_misses"):
        assert k in m[-1]
    # the final model loads with plain transformers and carries the constitution hash in its card
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out))
    with open(out / "README.md") as f:
        assert d.constitution.sha256 in f.read()
    assert (out / "samples.jsonl").exists()


def test_batched_rollouts_equal_per_prompt_rollouts(dirs, tmp_path):
    """generation_batch_size None (all prompts in one call) or 8 (two per call) gives each prompt the samples
    of generating it alone (one generator per prompt); samples keep their prompt, group and views."""
    from copsd.distill import Distiller

    got = {}
    for gbs in (4, 8, None):
        d = Distiller(distill_cfg(dirs, tmp_path / f"gbs{gbs}", per_device_train_batch_size=12, num_mini_batches=1,
                                  generation_batch_size=gbs))
        samples = d._rollout(0, d._prompt_indices(0))
        got[gbs] = [(s.prompt, s.group, s.completion, s.rollout_logp.tolist(), s.finish) for s in samples]
        assert [s.group for s in samples] == [k for k in range(3) for _ in range(4)]
        for s in samples:
            assert (s.student_ctx, s.teacher_ctx) == d._views(s.prompt)
    for gbs in (8, None):
        assert [x[:3] + (x[4],) for x in got[gbs]] == [x[:3] + (x[4],) for x in got[4]]
        for a, b in zip(got[gbs], got[4]):
            assert a[3] == pytest.approx(b[3], abs=1e-5)
    with pytest.raises(ValueError, match="generation_batch_size"):
        distill_cfg(dirs, tmp_path / "bad", generation_batch_size=6).validate()


def test_view_check_fails_before_step_1(dirs, tmp_path):
    from copsd.distill import Distiller

    bad = tmp_path / "bad_student"
    tok = tiny_tokenizer(chat_template=(
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' and '---' in messages[-2]['content'] %}"
        "<|assistant|> yes {{ m['content'] }} <|end|> {% else %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"))
    tiny_model(tok).save_pretrained(bad)
    tok.save_pretrained(bad)
    d = Distiller(distill_cfg({**dirs, "student": str(bad)}, tmp_path / "out", teacher_mode="initial"))
    with pytest.raises(ValueError, match="view-consistency"):
        d.train()
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_bad_data_line_is_reported(dirs, tmp_path):
    from copsd.distill import Distiller

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "hi", "kind": "benign"}\n{"prompt": "x", "kind": "bad"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl line 2"):
        Distiller(distill_cfg(dirs, tmp_path / "out", dataset=str(data)))


def test_ema_teacher_with_lora(dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    from copsd.distill import Distiller

    out = tmp_path / "ema"
    d = Distiller(distill_cfg(dirs, out, teacher_mode="ema", ema_decay=0.5, use_peft=True, lora_r=4,
                              lora_alpha=8, max_steps=2, save_steps=1, gradient_checkpointing=True))
    before = {k: v.clone() for k, v in d.ema.state_dict().items() if "lora_B" in k}
    d.train()
    after = d.ema.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "EMA teacher never moved"
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "checkpoint-1" / "ema_teacher.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert not any("lora" in k for k in merged.state_dict())


def test_sft_teacher_reduces_loss_and_writes_set(dirs, tmp_path):
    from copsd.config import SFTTeacherConfig
    from copsd.data import bundled, load_sft_rows
    from copsd.sft import SET_FILE, CrossSFT

    out = tmp_path / "teacher"
    cfg = SFTTeacherConfig(model_name_or_path=dirs["student"], output_dir=str(out),
                           constitution=bundled("constitution.md"), dataset=bundled("tiny_prompts.jsonl"),
                           sft_dataset=bundled("tiny_sft.jsonl"), per_device_train_batch_size=4,
                           max_completion_length=6, num_train_epochs=3, learning_rate=5e-3, report_to=["jsonl"],
                           disable_tqdm=True, backend="reference")
    s = CrossSFT(cfg)
    s.train()
    rows = load_sft_rows(str(out / SET_FILE))
    sources = [r.meta["source"] for r in rows]
    # the random student never ends an answer within 6 tokens: its 4 answers are cut, so left out (training
    # them with an end-of-turn token would teach the teacher to stop at the cap) and counted
    assert sources.count("reference") == 4 and sources.count("student") == 0 and sources.count("data") == 4
    stats = json.loads((out / "cross_sft_stats.json").read_text())
    assert stats == {"student_answers": 4, "student_truncated_dropped": 4}
    # harmful rows train on the reference answers; benign/general on the student's own answers
    assert all(r.messages[-1]["content"].startswith("i can not") for r in rows if r.meta["source"] == "reference")
    from copsd.sft import CrossSFT as Fresh

    fresh = Fresh(cfg)
    fresh.examples = s.examples
    assert s.dataset_loss() < fresh.dataset_loss() - 0.3
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out))


def test_sft_harmful_without_reference_needs_frontier(dirs, tmp_path):
    from copsd.config import SFTTeacherConfig
    from copsd.data import bundled
    from copsd.sft import CrossSFT

    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "how do i hurt my neighbor", "kind": "harmful"}\n')
    cfg = SFTTeacherConfig(model_name_or_path=dirs["student"], output_dir=str(tmp_path / "o"),
                           constitution=bundled("constitution.md"), dataset=str(data), disable_tqdm=True)
    with pytest.raises(ValueError, match=r"p\.jsonl line 1: harmful prompt without a 'reference'"):
        CrossSFT(cfg).train()
    cfg.frontier_model = ending_model_dir(tmp_path / "frontier")  # its answers end (cut ones are left out)
    cfg.max_completion_length = 32
    cfg.max_steps = 1
    CrossSFT(cfg).train()
    with open(tmp_path / "o" / "cross_sft_set.jsonl") as f:
        assert json.loads(f.readline())["source"] == "frontier"


def test_cli_reports_bad_config(tmp_path, capsys):
    from copsd.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_name_or_path: m\nnum_generatoins: 4\n")
    assert main(["distill", "--config", str(cfg)]) == 2
    assert "num_generatoins" in capsys.readouterr().err


def test_copsd_run_both_stages_and_eval(dirs, tmp_path):
    from copsd.cli import main
    from copsd.data import bundled

    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model_name_or_path: {dirs['student']}\noutput_dir: {tmp_path / 'run'}\n"
        f"constitution: {bundled('constitution.yaml')}\ndataset: {bundled('tiny_prompts.jsonl')}\n"
        "report_to: [jsonl]\ndisable_tqdm: true\nbackend: reference\nmax_completion_length: 4\n"
        "sft:\n  max_steps: 2\n  per_device_train_batch_size: 4\n"
        "distill:\n  max_steps: 2\n  num_generations: 4\n  per_device_train_batch_size: 8\n"
        f"eval:\n  prompt_files: [{bundled('tiny_prompts.jsonl')}]\n  max_new_tokens: 4\n")
    assert main(["run", "--config", str(cfg), "--distill.learning_rate", "1e-3"]) == 0
    root = tmp_path / "run"
    assert (root / "teacher" / "cross_sft_set.jsonl").exists() and (root / "teacher" / "model.safetensors").exists()
    assert (root / "student" / "model.safetensors").exists()
    state = json.loads((root / "student" / "metrics.jsonl").read_text().splitlines()[-1])
    assert state["step"] == 2
    report = json.loads((root / "eval" / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["base", "teacher", "student"]


def test_collapse_alarms():
    from types import SimpleNamespace

    from copsd.config import DistillConfig
    from copsd.distill import Distiller

    fake = SimpleNamespace(cfg=DistillConfig(alarm_length_fraction=0.6, alarm_entropy_fraction=0.5,
                                             alarm_benign_refusal_increase=0.25), initial={})
    first = {"completion_length": 100.0, "entropy": 1.2, "refusal_rate_benign": 0.1}
    assert Distiller._alarms(fake, first) == [] and fake.initial == first
    assert Distiller._alarms(fake, {"completion_length": 70.0, "entropy": 0.7, "refusal_rate_benign": 0.3}) == []
    alarms = Distiller._alarms(fake, {"completion_length": 50.0, "entropy": 0.5, "refusal_rate_benign": 0.4})
    assert len(alarms) == 3 and "length" in alarms[0] and "entropy" in alarms[1] and "benign" in alarms[2]
    # a step without benign prompts (NaN rate) raises no refusal alarm
    calm = {"completion_length": 90.0, "entropy": 1.1, "refusal_rate_benign": float("nan")}
    assert Distiller._alarms(fake, calm) == []


def test_stop_on_collapse_saves_and_stops(dirs, tmp_path):
    from copsd.distill import Distiller

    out = tmp_path / "c"
    # a length "collapse" threshold above 1 fires at the first comparison (step 2)
    d = Distiller(distill_cfg(dirs, out, teacher_mode="initial", max_steps=4, max_completion_length=3,
                              alarm_length_fraction=2.0, stop_on_collapse=True))
    m = d.train()
    assert d.step == 2 and m["alarms"] >= 1
    assert (out / "checkpoint-2" / "trainer_state.json").exists() and not (out / "model.safetensors").exists()
