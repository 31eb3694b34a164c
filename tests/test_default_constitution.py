"""The bundled default constitution and its use when a config names none."""

import os
import re

import pytest

from copsd.config import DistillConfig, SFTTeacherConfig, build_config, run_config_from_args
from copsd.constitution import DEFAULT_CONSTITUTION, load_constitution

BASE = {"model_name_or_path": "m", "output_dir": "o", "dataset": "d.jsonl", "teacher_mode": "initial"}
YAML_TWIN = os.path.join(os.path.dirname(DEFAULT_CONSTITUTION), "default.yaml")


def test_markdown_and_yaml_twins_load_to_the_same_content():
    md, ym = load_constitution(DEFAULT_CONSTITUTION), load_constitution(YAML_TWIN)
    assert md.default == ym.default and md.categories == ym.categories
    assert md.sha256 == ym.sha256


def test_structure_risk_levels_three_paths_and_no_mention_rule():
    c = load_constitution(DEFAULT_CONSTITUTION)
    text = c.default
    for level in ("Benign", "Ambiguous", "Harmful"):
        assert f"**{level}**" in text
    paths = re.findall(r"\*\*Path (\d), ([a-z ]+)", text)
    assert [p[0] for p in paths] == ["1", "2", "3"]
    assert [p[1] for p in paths] == ["help fully ", "help safely ", "decline and redirect "]
    # the closing instruction comes last and forbids mentioning or quoting the text
    tail = text[text.index("## Your reply"):]
    assert "Do not mention, quote" in tail and "constitution" in tail
    assert text.rstrip().endswith("constitution.")


def test_category_sections_add_guidance_before_the_whole_protocol():
    c = load_constitution(DEFAULT_CONSTITUTION)
    assert {"violence", "self_harm", "cyber", "privacy", "crime", "hate", "over_refusal"} <= set(c.categories)
    for name, body in c.categories.items():
        assert "{default}" not in body, name
        assert body.endswith(c.default), name  # the shared protocol, ending with the no-mention rule, comes last
        note = body[: -len(c.default)].strip()
        assert note.startswith("This request may"), name
        assert c.text_for(name) == body
    with pytest.raises(ValueError, match="no_such_category"):  # an undefined category is an error, not the default
        c.text_for("no_such_category")


def test_default_placeholder_in_user_files(tmp_path):
    p = tmp_path / "c.md"
    p.write_text("Be kind.\n\n## category: x\nBe extra careful.\n\n{default}\n\n## category: y\nOnly this.\n")
    c = load_constitution(str(p))
    assert c.categories == {"x": "Be extra careful.\n\nBe kind.", "y": "Only this."}
    q = tmp_path / "c.yaml"
    q.write_text("default: Be kind.\ncategories:\n  x: \"{default} And more.\"\n")
    assert load_constitution(str(q)).categories == {"x": "Be kind. And more."}


@pytest.mark.parametrize("cls", [DistillConfig, SFTTeacherConfig])
def test_configs_default_to_the_bundled_constitution(cls):
    values = {k: v for k, v in BASE.items() if cls is DistillConfig or k != "teacher_mode"}
    cfg = build_config(cls, values).validate()
    assert cfg.constitution == DEFAULT_CONSTITUTION and os.path.isfile(cfg.constitution)
    cfg = build_config(cls, {**values, "constitution": "mine.md"}).validate()
    assert cfg.constitution == "mine.md"


def test_run_config_defaults_both_stages(tmp_path):
    import argparse

    from copsd.config import add_run_arguments

    p = argparse.ArgumentParser()
    add_run_arguments(p)
    args = p.parse_args(["--model_name_or_path", "m", "--output_dir", str(tmp_path), "--dataset", "d.jsonl"])
    rc = run_config_from_args(args)
    assert rc.sft.constitution == rc.distill.constitution == DEFAULT_CONSTITUTION
