"""copsd.eval and ``copsd eval`` on a tiny random model with the toy tokenizer (fast, CPU)."""

import json
import math
import os
import re

import pytest
import torch

from copsd import eval as ev
from copsd import textmetrics as tm
from copsd.toy import world
from copsd.toy.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Llama + the toy tokenizer, saved; a constitution file; a mixed prompt file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny_eval")
    corpus = world.pretraining_corpus(300, 0)
    sets = world.prompt_sets(0, n_train=20, n_heldout=12)
    tok = train_tokenizer([m["content"] for c in corpus for m in c["messages"]]
                          + [r["prompt"] for r in sets["heldout"]] + [world.CONSTITUTION_TEXT])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    # make the end token likely so responses have varied, mostly short lengths
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = model.model.norm.weight.detach() * 0.3
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    const = root / "constitution.md"
    const.write_text(world.CONSTITUTION_TEXT + "\n")
    prompts = root / "prompts.jsonl"
    with open(prompts, "w") as f:
        for r in sets["heldout"]:
            f.write(json.dumps(r) + "\n")
    return {"dir": str(model_dir), "model": model, "tok": tok, "constitution": str(const),
            "prompts": str(prompts), "rows": sets["heldout"], "root": root}


def _run(tiny, out, **kw):
    models = [{"name": "base", "path": tiny["dir"]},
              {"name": "teacher", "path": tiny["dir"], "constitution": tiny["constitution"]}]
    args = dict(num_samples=3, max_new_tokens=12, batch_size=5, seed=3, progress=False, print_table=False)
    args.update(kw)
    return ev.evaluate_models(models, [tiny["prompts"]], str(out), **args)


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_report_has_every_metric_and_matches_responses(tiny, tmp_path):
    from test_textmetrics import _brute_self_bleu

    report = _run(tiny, tmp_path)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["models"] == json.loads(json.dumps(report["models"]))
    assert [m["name"] for m in report["models"]] == ["base", "teacher"]
    n = len(tiny["rows"])
    for m in report["models"]:
        assert set(ev.METRICS) <= set(m["metrics"])
        samples = _read_jsonl(tmp_path / m["responses_file"])
        assert len(samples) == 3 * n
        # recompute the headline metrics from the saved responses, independently of eval.py
        harm, ben, gen = ([s for s in samples if s["kind"] == k] for k in ("harmful", "benign", "general"))
        refused = [tm.is_refusal(s["response"]) for s in samples]
        assert [s["refusal"] for s in samples] == refused
        assert m["metrics"]["harmful_refusal"] == pytest.approx(sum(s["refusal"] for s in harm) / len(harm))
        assert m["metrics"]["benign_compliance"] == pytest.approx(1 - sum(s["refusal"] for s in ben) / len(ben))
        assert m["metrics"]["general_compliance"] == pytest.approx(1 - sum(s["refusal"] for s in gen) / len(gen))
        over = [s for s in ben if s["category"] == "over_refusal"]
        if over:
            assert m["metrics"]["over_refusal_compliance"] == pytest.approx(
                1 - sum(s["refusal"] for s in over) / len(over))
        assert m["metrics"]["mean_length"] == pytest.approx(sum(s["length"] for s in samples) / len(samples))
        assert m["metrics"]["benign_mean_length"] == pytest.approx(sum(s["length"] for s in ben) / len(ben))
        groups = {}
        for s in samples:
            # self-BLEU's documented tokenization: lower-cased words and punctuation marks
            groups.setdefault(s["prompt_index"], []).append(re.findall(r"\w+|[^\w\s]", s["response"].lower()))
        div = sum(1 - _brute_self_bleu(g) for g in groups.values()) / len(groups)
        assert m["metrics"]["diversity"] == pytest.approx(div, abs=1e-9)
        assert 0 <= m["metrics"]["leak_rate"] <= 1
        assert m["metrics"]["mean_token_entropy"] > 0
    # the teacher view differs from the student view, so the same weights answer differently
    assert report["models"][1]["constitution_sha256"] and not report["models"][0]["constitution_sha256"]
    for png in ("safety_vs_helpfulness.png", "lengths.png", "entropy.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = ev.format_table(report)
    assert "teacher +constitution" in table and "harm.refuse" in table


def test_generation_is_seeded(tiny, tmp_path):
    a = _run(tiny, tmp_path / "a", plots=False)
    b = _run(tiny, tmp_path / "b", plots=False)
    c = _run(tiny, tmp_path / "c", plots=False, seed=4)
    ra = _read_jsonl(tmp_path / "a" / "responses-base.jsonl")
    assert ra == _read_jsonl(tmp_path / "b" / "responses-base.jsonl")
    assert ra != _read_jsonl(tmp_path / "c" / "responses-base.jsonl")
    assert a["models"][0]["metrics"] == b["models"][0]["metrics"]
    del c


def test_greedy_matches_hf_generate(tiny, tmp_path):
    """temperature 0: our prompt rendering + generation equals transformers' greedy generate."""
    from copsd.constitution import teacher_messages

    _run(tiny, tmp_path, temperature=0.0, num_samples=1, plots=False)
    samples = _read_jsonl(tmp_path / "responses-teacher.jsonl")
    tok, model = tiny["tok"], tiny["model"]
    for i in (0, 5):
        msgs = teacher_messages([{"role": "user", "content": tiny["rows"][i]["prompt"]}], world.CONSTITUTION_TEXT)
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        body = [t for t in out if t != tok.eos_token_id]
        assert samples[i]["length"] == len(body)
        assert samples[i]["response"] == tok.decode(body, skip_special_tokens=True).strip()


def test_response_entropies_match_full_softmax(tiny):
    model = tiny["model"]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 50, (n,), generator=g).tolist() for n in (5, 9, 3)]
    comps = [torch.randint(3, 50, (n,), generator=g).tolist() for n in (4, 0, 7)]
    got = ev.response_entropies(model, prompts, comps, batch_tokens=12)
    for p, c, h in zip(prompts, comps, got):
        assert len(h) == len(c)
        if not c:
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c])).logits[0].double()
        ref = torch.distributions.Categorical(logits=logits[len(p) - 1 : len(p) - 1 + len(c)]).entropy()
        assert h == pytest.approx(ref.tolist(), abs=1e-4)


def test_custom_detector_and_leak_files(tiny, tmp_path):
    def says_sure(prompts, responses):  # a pluggable detector: everything not opening with "sure" is refused
        return [not r.startswith("sure") for r in responses]

    report = _run(tiny, tmp_path, refusal_detector=says_sure, leak_constitutions=[], plots=False)
    samples = _read_jsonl(tmp_path / "responses-base.jsonl")
    assert [s["refusal"] for s in samples] == [not s["response"].startswith("sure") for s in samples]
    assert report["models"][0]["metrics"]["leak_rate"] is None


def test_bad_inputs(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    with pytest.raises(ValueError, match="cannot load 'no-such-org/no-such-model' from local files"):
        ev.evaluate_models([{"name": "x", "path": "no-such-org/no-such-model"}], [tiny["prompts"]], str(tmp_path))
    with pytest.raises(ValueError, match="path"):
        ev.evaluate_models([{"name": "x", "path": str(tmp_path / "missing")}], [tiny["prompts"]], str(tmp_path))
    with pytest.raises(ValueError, match="duplicate name"):
        ev.evaluate_models([{"name": "x", "path": tiny["dir"]}] * 2, [tiny["prompts"]], str(tmp_path))
    with pytest.raises(ValueError, match="constitution file not found"):
        ev.evaluate_models([{"name": "x", "path": tiny["dir"], "constitution": "nope.md"}], [tiny["prompts"]],
                           str(tmp_path))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "kind": "benign"}\n{"prompt": "x", "kind": "evil"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2"):
        ev.evaluate_models([{"name": "x", "path": tiny["dir"]}], [str(bad)], str(tmp_path))
    with pytest.raises(ValueError, match="num_samples"):
        ev.evaluate_models([{"name": "x", "path": tiny["dir"]}], [tiny["prompts"]], str(tmp_path), num_samples=0)


def test_failed_evaluation_leaves_no_output_dir(tiny, tmp_path, monkeypatch):
    """A model that fails to load (after the inputs were checked) leaves no empty output directory behind;
    an output_dir that is a file is refused before any model loads."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    out = tmp_path / "eval_out"
    models = [{"name": "base", "path": tiny["dir"]}, {"name": "x", "path": "no-such-org/no-such-model"}]
    with pytest.raises(ValueError, match="cannot load 'no-such-org/no-such-model'"):
        ev.evaluate_models(models, [tiny["prompts"]], str(out), num_samples=1, max_new_tokens=2, progress=False,
                           print_table=False)
    assert not out.exists()
    afile = tmp_path / "a_file"
    afile.write_text("")
    with pytest.raises(ValueError, match="output_dir.*not a directory"):
        ev.evaluate_models([{"name": "x", "path": "no-such-org/no-such-model"}], [tiny["prompts"]], str(afile))


def test_cli(tiny, tmp_path, capsys):
    from copsd.cli import main

    out = tmp_path / "cli"
    rc = main(["eval", "--model", f"base={tiny['dir']}", "--model", f"teacher={tiny['dir']}",
               "--constitution", f"teacher={tiny['constitution']}", "--prompts", tiny["prompts"],
               "--output_dir", str(out), "--num_samples", "2", "--max_new_tokens", "6", "--no_progress",
               "--no_plots"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "teacher +constitution" in printed and "report:" in printed
    report = json.loads((out / "report.json").read_text())
    assert [m["constitution"] for m in report["models"]] == [None, tiny["constitution"]]
    assert not os.path.exists(out / "lengths.png")
    rc = main(["eval", "--model", tiny["dir"], "--constitution", "nobody=x.md", "--prompts", tiny["prompts"],
               "--output_dir", str(out)])
    assert rc == 2
    assert "no --model named 'nobody'" in capsys.readouterr().err
    assert math.isfinite(report["models"][0]["metrics"]["mean_length"])
