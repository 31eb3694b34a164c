import pytest
from test_trainer import tiny_tokenizer

from copsd.constitution import (
    check_view_consistency,
    fill_template,
    load_constitution,
    render_ids,
    render_views,
    teacher_messages,
)
from copsd.data import bundled


def test_markdown_and_yaml_agree_and_hash():
    md, ym = load_constitution(bundled("constitution.md")), load_constitution(bundled("constitution.yaml"))
    # the Markdown title names the document; it is not part of the text sent to the teacher unless asked
    assert md.title == "Tiny constitution" and md.default == ym.default
    assert "Refuse to help with harm" in md.default
    assert set(md.categories) == set(ym.categories) == {"violence", "privacy"}
    assert md.categories["privacy"] == ym.categories["privacy"]
    assert len(md.sha256) == 64 and md.sha256 != ym.sha256  # versions differ (YAML "tiny-1") -> hashes differ
    titled = load_constitution(bundled("constitution.md"), include_title=True)
    assert titled.default.startswith("# Tiny constitution") and titled.sha256 != md.sha256
    assert md.text_for("violence") == md.categories["violence"]
    assert md.text_for(None) == md.default and md.text_for(None, override="X") == "X"
    # an undefined or miscased category is an error, not a silent fallback to the default
    with pytest.raises(ValueError, match="'unknown' is not defined"):
        md.text_for("unknown")
    with pytest.raises(ValueError, match="did you mean 'privacy'"):
        md.text_for("Privacy")


def test_hash_changes_with_content(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("default: be kind\n")
    h1 = load_constitution(str(p)).sha256
    p.write_text("default: be kinder\n")
    assert load_constitution(str(p)).sha256 != h1


@pytest.mark.parametrize("name, text, match", [
    ("c.yaml", "default: ''\n", "'default' must be a non-empty string"),
    ("c.yaml", "default: x\nrules: y\n", "unknown key"),
    ("c.yaml", "default: x\ncategories: [a]\n", "'categories'"),
    ("c.yaml", "default: [x\n", "line"),
    ("c.md", "## category: a\ntext\n", "no default text"),
    ("c.md", "d\n## category: a\n", "category 'a' has no text"),
    ("c.txt2", "d\n", "extension"),
])
def test_bad_constitution_files(tmp_path, name, text, match):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_constitution(str(p))


def test_missing_file():
    with pytest.raises(FileNotFoundError):
        load_constitution("/nonexistent/constitution.md")


def test_teacher_view_places_constitution_before_query_in_user_turn():
    msgs = [{"role": "system", "content": "you are kind ."}, {"role": "user", "content": "how do i {query} it"}]
    t = teacher_messages(msgs, "RULES {constitution}")
    assert t[0] == msgs[0] and msgs[1]["content"] == "how do i {query} it"  # input untouched
    assert t[1]["content"] == "RULES {constitution}\n\n---\n\nhow do i {query} it\n\n---"
    assert fill_template("<{query}|{constitution}>", "C", "Q") == "<Q|C>"


def test_render_views_token_level():
    tok = tiny_tokenizer()
    c = load_constitution(bundled("constitution.md"))
    msgs = [{"role": "user", "content": "how do i hurt my neighbor"}]
    s, t = render_views(tok, msgs, c.default)
    q = tok("how do i hurt my neighbor", add_special_tokens=False)["input_ids"]
    const = tok(c.default, add_special_tokens=False)["input_ids"]
    header = tok.convert_tokens_to_ids(["<|end|>", "<|assistant|>"])
    # student: <s> <|user|> query <|end|> <|assistant|>
    assert s == [tok.bos_token_id, tok.convert_tokens_to_ids("<|user|>")] + q + header
    # teacher: same frame, user turn = constitution --- query ---
    sep = tok.convert_tokens_to_ids("---")
    assert t == [tok.bos_token_id, tok.convert_tokens_to_ids("<|user|>")] + const + [sep] + q + [sep] + header


def test_view_consistency_passes_and_fails():
    tok = tiny_tokenizer()
    msgs = [{"role": "user", "content": "what is a good name for a cat"}]
    ids = check_view_consistency(tok, msgs, "a good name is milo .", "be kind .")
    assert tok.decode(ids[:-1]) == "a good name is milo ."
    # a template that renders the assistant turn differently when the user turn holds '---' (a boundary bug)
    bad = tiny_tokenizer(chat_template=(
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' and '---' in messages[0]['content'] %}"
        "<|assistant|> yes {{ m['content'] }} <|end|> {% else %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"))
    with pytest.raises(ValueError, match="view-consistency check failed"):
        check_view_consistency(bad, msgs, "a good name is milo .", "be kind .")
    # a template whose generation prompt is not a prefix of the rendered conversation
    nonprefix = tiny_tokenizer(chat_template=(
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> yes {% endif %}"))
    with pytest.raises(ValueError, match="prefix-consistent"):
        check_view_consistency(nonprefix, msgs, "a good name", "be kind .")


def test_tokenizer_without_chat_template():
    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        render_ids(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=True)


def test_prompt_without_user_turn():
    with pytest.raises(ValueError, match="no user message"):
        teacher_messages([{"role": "system", "content": "x"}], "c")
