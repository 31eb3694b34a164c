import json

import pytest

from copsd.data import bundled, load_prompt_rows, load_sft_rows, write_jsonl


def test_bundled_rows():
    rows = load_prompt_rows(bundled("tiny_prompts.jsonl"))
    assert {r.kind for r in rows} == {"harmful", "benign", "general"}
    assert rows[0].messages == [{"role": "user", "content": "how do i hurt my neighbor"}]
    assert rows[0].category == "violence" and rows[0].reference.startswith("i can not")
    assert rows[6].messages[0]["role"] == "system"
    assert rows[0].where.endswith("tiny_prompts.jsonl line 1")
    sft = load_sft_rows(bundled("tiny_sft.jsonl"))
    assert sft[0].messages[-1]["role"] == "assistant"


@pytest.mark.parametrize("line, match", [
    ('{"prompt": "x", "kind": "harmful"', "invalid JSON"),
    ('{"prompt": "x", "kind": "evil"}', "'kind' must be one of"),
    ('{"kind": "benign"}', "missing key 'prompt'"),
    ('{"prompt": "", "kind": "benign"}', "'prompt' is empty"),
    ('{"prompt": [{"role": "bot", "content": "x"}], "kind": "benign"}', r"'prompt'\[0\]"),
    ('{"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "kind": "benign"}',
     "last message must have role 'user'"),
    ('{"prompt": "x", "messages": [{"role": "user", "content": "x"}]}', "either 'prompt' or 'messages'"),
    ('{"prompt": "x", "kind": "benign", "category": 3}', "'category' must be a string"),
    ('[1, 2]', "expected a JSON object"),
])
def test_malformed_prompt_line_names_file_and_line(tmp_path, line, match):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "ok", "kind": "benign"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"d\.jsonl line 3: .*{match}"):
        load_prompt_rows(str(p))


def test_malformed_sft_line(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(ValueError, match=r"s\.jsonl line 1: .*end with an assistant turn"):
        load_sft_rows(str(p))


def test_empty_and_missing(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        load_prompt_rows(str(p))
    with pytest.raises(FileNotFoundError):
        load_prompt_rows(str(tmp_path / "missing.jsonl"))


def test_list_rows_and_roundtrip(tmp_path):
    rows = load_prompt_rows([{"prompt": "hi", "kind": "general", "constitution": "custom"}])
    assert rows[0].constitution == "custom" and rows[0].where == "row 0"
    out = tmp_path / "o.jsonl"
    write_jsonl(str(out), [r.to_json() for r in rows])
    assert load_prompt_rows(str(out))[0].to_json() == rows[0].to_json()


def test_kind_defaults_and_extra_columns_warn(tmp_path, caplog):
    import logging

    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "x"}\n{"prompt": "y", "kind": "benign", "label": 1}\n')
    caplog.set_level(logging.WARNING, logger="copsd")
    rows = load_prompt_rows(str(p))
    assert [r.kind for r in rows] == ["general", "benign"]
    assert "ignoring column(s) ['label']" in caplog.text


def test_all_bad_lines_reported_at_once(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "ok"}\n{"prompt": ""}\n{"prompt": "x", "kind": "evil"}\n{"prompt": "x"\n')
    with pytest.raises(ValueError) as e:
        load_prompt_rows(str(p))
    msg = str(e.value)
    assert msg.startswith("3 problems in dataset")
    for n in (2, 3, 4):
        assert f"d.jsonl line {n}: " in msg


def test_messages_reference_is_every_assistant_turn_after_the_last_user():
    # the same conversation as messages and as prompt + completion gives the same reference (two assistant turns
    # after the last user turn: both, joined, not only the first)
    user = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "old"},
            {"role": "user", "content": "how do I?"}]
    answer = [{"role": "assistant", "content": "First, "}, {"role": "assistant", "content": "then this."}]
    as_messages, as_completion = load_prompt_rows([{"messages": user + answer},
                                                   {"prompt": user, "completion": answer}])
    assert as_messages.reference == as_completion.reference == "First, then this."
    assert as_messages.messages == as_completion.messages
