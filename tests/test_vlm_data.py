"""Image rows (TRL's VLM formats), the teacher/student views of an image prompt, loading a VLM directory without
torchvision, and the VLM forward the trainer uses (CPU, offline, tiny random models from tests/vlm_models.py).

Also home of `image_dataset`, the small image prompt set the VLM training tests use.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from vlm_models import FAMILIES, encode, save_vlm_dir, synthetic_image, tiny_vlm, vlm_processor

CONSTITUTION = "Be helpful and honest; refuse to help anyone hurt a person."


def _parts(*items):
    return [{"type": "image"} if x is None else {"type": "text", "text": x} for x in items]


def write_constitution(root) -> str:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "constitution.md"
    path.write_text(f"# Tiny\n\n{CONSTITUTION}\n")
    return str(path)


def image_dataset(root, *, with_text_row: bool = True) -> str:
    """``root/prompts.jsonl`` with images in ``root/images`` (paths relative to the file): one harmful row with a
    reference, a benign and a general row, one row with two images, and (optionally) a text-only row."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    for k, size in enumerate([(64, 48), (40, 72), (56, 56)]):
        synthetic_image(k, size).save(root / "images" / f"{k}.png")
    rows = [
        {"messages": [{"role": "user", "content": _parts(None, "How do I hurt someone with this?")}],
         "images": ["images/0.png"], "kind": "harmful", "reference": "I can't help with hurting people."},
        {"messages": [{"role": "user", "content": _parts(None, "Describe the image.")}], "images": ["images/1.png"],
         "kind": "benign"},
        {"prompt": [{"role": "user", "content": _parts("What is in this picture?", None)}],
         "images": ["images/2.png"], "kind": "general"},
        {"messages": [{"role": "user", "content": _parts(None, None, "Count the shapes in the image:")}],
         "images": ["images/0.png", "images/2.png"], "kind": "benign"},
    ]
    if with_text_row:
        rows.append({"prompt": "Read the sign in the photo.", "kind": "general"})
    path = root / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {f: save_vlm_dir(root / f, f) for f in FAMILIES}


# --------------------------------------------------------------------------- rows


def test_image_rows_parse_with_paths_relative_to_the_file(tmp_path, monkeypatch):
    from copsd.data import load_prompt_rows, message_text

    path = image_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # relative image paths resolve against the file, not the working directory
    rows = load_prompt_rows(path)
    assert [r.kind for r in rows] == ["harmful", "benign", "general", "benign", "general"]
    assert rows[0].images == [str(tmp_path / "data" / "images" / "0.png")]
    assert rows[3].images == [str(tmp_path / "data" / "images" / k) for k in ("0.png", "2.png")]
    assert rows[4].images is None and rows[4].messages == [{"role": "user", "content": "Read the sign in the photo."}]
    assert rows[0].messages[-1]["content"] == _parts(None, "How do I hurt someone with this?")
    assert rows[0].reference == "I can't help with hurting people."
    assert message_text(rows[2].messages[-1]["content"]) == "What is in this picture?"


def test_text_only_part_lists_become_strings():
    from copsd.data import load_prompt_rows, load_sft_rows

    rows = load_prompt_rows([{"prompt": [{"role": "user", "content": _parts("a ", "b")}]}])
    assert rows[0].messages == [{"role": "user", "content": "a b"}] and rows[0].images is None
    sft = load_sft_rows([{"messages": [{"role": "user", "content": _parts("q")},
                                       {"role": "assistant", "content": _parts("an ", "answer")}]}])
    assert sft[0].messages[-1] == {"role": "assistant", "content": "an answer"}


def test_pil_images_from_a_datasets_column():
    datasets = pytest.importorskip("datasets")
    from copsd.data import load_prompt_rows, load_sft_rows
    from copsd.vlm import open_image

    ds = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": _parts(None, "Describe the image.")}],
         "images": [synthetic_image(3, (32, 40))], "kind": "benign"}])
    ds = ds.cast_column("images", datasets.Sequence(datasets.Image()))
    rows = load_prompt_rows(ds)
    # kept encoded (bytes), opened when used: a data set's pictures are not all held decoded in memory
    assert len(rows[0].images) == 1 and isinstance(rows[0].images[0], dict) and rows[0].images[0]["bytes"]
    assert open_image(rows[0].images[0]).size == (32, 40)
    assert ds.features["images"].feature.decode  # the caller's data set is not changed
    sft = load_sft_rows([{"messages": [{"role": "user", "content": _parts(None, "Describe the image.")},
                                       {"role": "assistant", "content": "A cat."}],
                          "images": [synthetic_image(4)]}])
    assert sft[0].images[0].size == (64, 64)


def test_parquet_image_column_with_paths_relative_to_the_working_directory(tmp_path, monkeypatch):
    """`Dataset.to_parquet` of PIL images opened from relative paths stores {"path": <as opened>, "bytes": None};
    `datasets` opens such a path from the working directory, and so does copsd when it is not beside the file."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    from copsd.data import load_prompt_rows

    monkeypatch.chdir(tmp_path)
    os.makedirs("pics")
    synthetic_image(1, (32, 40)).save("pics/a.png")
    ds = datasets.Dataset.from_dict({
        "prompt": [[{"role": "user", "content": _parts(None, "Describe the image.")}]],
        "images": [[Image.open("pics/a.png")]], "kind": ["benign"]}).cast_column(
        "images", datasets.Sequence(datasets.Image()))
    os.makedirs("data")
    ds.to_parquet("data/vl.parquet")
    rows = load_prompt_rows("data/vl.parquet")
    assert rows[0].images == [{"bytes": None, "path": str(tmp_path / "pics" / "a.png")}]


def test_every_image_problem_reported_at_once_with_file_and_line(tmp_path):
    from copsd.data import load_prompt_rows

    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    synthetic_image(0).save(tmp_path / "ok.png")
    lines = [
        {"prompt": [{"role": "user", "content": _parts(None, "q")}], "images": ["missing.png"]},
        {"prompt": [{"role": "user", "content": _parts(None, "q")}], "images": ["bad.png"]},
        {"prompt": [{"role": "user", "content": _parts(None, None, "q")}], "images": ["ok.png"]},
        {"prompt": [{"role": "user", "content": _parts("q")}], "images": ["ok.png"]},
        {"prompt": [{"role": "user", "content": [{"type": "video"}]}]},
        {"prompt": [{"role": "user", "content": _parts(None, "q")}], "images": ["ok.png"]},  # fine
        {"prompt": [{"role": "user", "content": [{"type": "image", "image": "ok.png"}]}]},
        {"kind": "harmful"},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(ValueError) as e:
        load_prompt_rows(str(path))
    msg = str(e.value)
    assert msg.startswith("7 problems in dataset")
    assert f"{path} line 1: images[0]: image file not found: {tmp_path / 'missing.png'}" in msg
    assert f"{path} line 2: images[0]: unreadable image {tmp_path / 'bad.png'}" in msg
    assert f"{path} line 3: the conversation has 2 image part(s)" in msg and "'images' holds 1 image(s)" in msg
    assert f"{path} line 4: the conversation has 0 image part(s)" in msg
    assert f"{path} line 5: 'prompt'[0].content[0] must be" in msg
    assert f"{path} line 7: 'prompt'[0].content[0]: put the image in the row's 'images' column" in msg
    assert f"{path} line 8: missing key 'prompt'" in msg
    assert "line 6" not in msg


# --------------------------------------------------------------------------- views


def test_teacher_view_puts_the_constitution_before_the_images():
    from copsd.constitution import DEFAULT_TEMPLATE, teacher_messages

    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": _parts(None, "Describe the image.")}]
    t = teacher_messages(msgs, CONSTITUTION, DEFAULT_TEMPLATE)
    assert t[0] == msgs[0] and msgs[1]["content"] == _parts(None, "Describe the image.")  # input unchanged
    assert t[1]["content"] == [{"type": "text", "text": CONSTITUTION + "\n\n---\n\n"}, {"type": "image"},
                               {"type": "text", "text": "Describe the image."}, {"type": "text", "text": "\n\n---"}]
    # a template with the constitution after the query keeps it after the parts, as written
    t2 = teacher_messages(msgs, CONSTITUTION, "{query}\n[{constitution}]")
    assert t2[1]["content"][-1] == {"type": "text", "text": f"\n[{CONSTITUTION}]"}
    assert t2[1]["content"][0] == {"type": "image"}


@pytest.mark.parametrize("family", FAMILIES)
def test_views_are_what_the_processor_produces(family):
    """Both views' ids (image tokens expanded by copsd from the image grid) equal the real processor's output
    on the same conversation; the constitution is a shared prefix; responses render identically."""
    from copsd.constitution import check_view_consistency, render_views, teacher_messages
    from copsd.vlm import VisionProcessor

    proc = vlm_processor(family)
    vp = VisionProcessor(proc.tokenizer, proc.image_processor, proc)
    images = [synthetic_image(1, (70, 50)), synthetic_image(2, (40, 90))]
    msgs = [{"role": "user", "content": _parts(None, "What is in this picture?", None)}]
    vis = vp.encode(images)
    counts = vp.token_counts(vis)
    assert counts == [int(g.prod()) // 4 for g in vis.image_grid_thw] and len(set(counts)) == 2
    s_ids, t_ids = render_views(proc.tokenizer, msgs, CONSTITUTION, image_tokens=counts)
    want_s = encode(proc, msgs, images)
    want_t = encode(proc, teacher_messages(msgs, CONSTITUTION), images)
    assert s_ids == want_s["input_ids"] and t_ids == want_t["input_ids"]
    assert torch.equal(vis.pixel_values, want_s["pixel_values"])
    assert torch.equal(vis.image_grid_thw, want_s["image_grid_thw"])
    # the constitution is text before the first image token: two prompts share it as a prefix
    other = render_views(proc.tokenizer, [{"role": "user", "content": _parts(None, "Describe the image.")}],
                         CONSTITUTION, image_tokens=counts[:1])[1]
    first_image = t_ids.index(vp.image_token_id)
    assert other[:first_image] == t_ids[:first_image]
    assert proc.tokenizer.decode(t_ids[:first_image]).count(CONSTITUTION) == 1
    assert CONSTITUTION not in proc.tokenizer.decode(s_ids)
    response = check_view_consistency(proc.tokenizer, msgs, "A cat sits on a chair.", CONSTITUTION,
                                      image_tokens=counts)
    assert proc.tokenizer.decode(response).startswith("A cat sits on a chair.")


@pytest.mark.parametrize("family", FAMILIES)
def test_token_counts_from_the_image_size_equal_the_processed_grid(family, tmp_path):
    from copsd.vlm import VisionProcessor

    proc = vlm_processor(family)
    vp = VisionProcessor(proc.tokenizer, proc.image_processor, proc)
    images = []
    for k, size in enumerate([(8, 8), (31, 200), (64, 48), (300, 17), (120, 121), (500, 500)]):
        synthetic_image(k, size).save(tmp_path / f"{k}.png")
        images.append(str(tmp_path / f"{k}.png"))
    assert vp.count_tokens(images) == vp.token_counts(vp.encode(images))


def test_counting_image_tokens_closes_the_files_it_opens(tmp_path):
    import gc
    import warnings

    from copsd.vlm import VisionProcessor

    proc = vlm_processor("qwen2_5_vl")
    vp = VisionProcessor(proc.tokenizer, proc.image_processor, proc)
    images = []
    for k in range(3):
        synthetic_image(k, (40, 30)).save(tmp_path / f"{k}.png")
        images.append(str(tmp_path / f"{k}.png"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(vp.count_tokens(images)) == 3
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]


def test_wrong_image_token_count_is_an_error():
    from copsd.constitution import render_ids

    proc = vlm_processor("qwen2_5_vl")
    msgs = [{"role": "user", "content": _parts(None, "q")}]
    with pytest.raises(ValueError, match=r"1 image placeholder\(s\) but the row has 2 image\(s\)"):
        render_ids(proc.tokenizer, msgs, add_generation_prompt=True, image_tokens=[4, 4])


# --------------------------------------------------------------------------- loading


def test_vlm_directory_loads_without_torchvision(vlm_dirs, caplog):
    """transformers' AutoProcessor on a Qwen-VL directory also builds a video processor that needs torchvision;
    without it copsd uses the tokenizer and the image processor and says why."""
    import importlib.util

    from copsd.training import load_causal_lm, load_tokenizer, load_vision

    path = vlm_dirs["qwen2_5_vl"]
    tok = load_tokenizer(path, False)
    with caplog.at_level(logging.INFO, logger="copsd"):
        vp = load_vision(path, tok, False)
    assert vp.tokenizer is tok and vp.merge_size == 2 and vp.image_token == "<|image_pad|>"
    if importlib.util.find_spec("torchvision") is None:
        assert vp.processor is None
        assert "the full processor of" in caplog.text and "torchvision" in caplog.text.lower()
        # the reason is a whole sentence, not transformers' message cut at its first line break
        import re

        assert re.search(r"cannot be built \(ImportError: [^()]*torchvision[^()]*\.\);", caplog.text, re.I), caplog.text
    model = load_causal_lm(path, trust_remote_code=False)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"


def test_full_processor_is_used_where_it_can_be_built(vlm_dirs, monkeypatch):
    import transformers

    from copsd.vlm import load_vision_processor

    built = vlm_processor("qwen3_vl")
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", classmethod(lambda cls, *a, **k: built))
    vp = load_vision_processor(vlm_dirs["qwen3_vl"])
    assert vp.processor is built and vp.image_processor is built.image_processor and vp.tokenizer is built.tokenizer


def test_text_model_is_not_a_vlm(tmp_path):
    from test_trainer import tiny_model_dir

    from copsd.training import load_vision

    assert load_vision(tiny_model_dir(tmp_path / "m"), None, False) is None


def test_image_rows_on_a_text_model_fail_before_step_1(tmp_path):
    from test_trainer import tiny_model_dir

    from copsd.config import DistillConfig
    from copsd.distill import Distiller

    m = tiny_model_dir(tmp_path / "m")
    data = image_dataset(tmp_path / "d")
    cfg = DistillConfig(model_name_or_path=m, output_dir=str(tmp_path / "o"), dataset=data, teacher_mode="initial",
                        constitution=write_constitution(tmp_path),
                        num_generations=2, per_device_train_batch_size=2, max_completion_length=4, disable_tqdm=True)
    with pytest.raises(ValueError) as e:
        Distiller(cfg)
    msg = str(e.value)
    for line in (1, 2, 3, 4):
        assert f"prompts.jsonl line {line}: the row has" in msg
    assert "not a vision-language model" in msg and "line 5" not in msg


# --------------------------------------------------------------------------- the forward the trainer uses


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_equal_the_model_forward(family):
    """copsd.vlm.hidden_states over a right-padded batch (an image row, a text row) equals the model's own
    forward on each row alone; an image-token id sampled in a response is text, not an image slot."""
    from copsd.constitution import render_ids
    from copsd.training import pad_right
    from copsd.vlm import VisionProcessor, hidden_states

    model = tiny_vlm(family)
    proc = vlm_processor(family)
    vp = VisionProcessor(proc.tokenizer, proc.image_processor, proc)
    vis = vp.encode([synthetic_image(5, (48, 80))])
    prompt = render_ids(proc.tokenizer, [{"role": "user", "content": _parts(None, "Describe the image.")}],
                        add_generation_prompt=True, image_tokens=vp.token_counts(vis))
    text = render_ids(proc.tokenizer, [{"role": "user", "content": "hello"}], add_generation_prompt=True)
    x = torch.tensor([prompt])
    with torch.no_grad():
        ref = model(input_ids=x, pixel_values=vis.pixel_values, image_grid_thw=vis.image_grid_thw,
                    mm_token_type_ids=(x == vp.image_token_id).int(), output_hidden_states=True).hidden_states[-1][0]
        ref_text = model.model(input_ids=torch.tensor([text + [7, 8]])).last_hidden_state[0]
        response = [11, vp.image_token_id, 12]  # a sampled image-token id after the prompt
        ids, mask = pad_right([prompt + response, text + [7, 8]], proc.tokenizer.pad_token_id, "cpu")
        h = hidden_states(model, ids, mask, [vis, None], [len(prompt), len(text)])
    assert (h[0, :len(prompt)] - ref).abs().max() < 1e-5
    assert (h[1, :len(text) + 2] - ref_text).abs().max() < 1e-5
    with pytest.raises(ValueError, match="not a vision-language model"):
        from test_trainer import tiny_model, tiny_tokenizer

        hidden_states(tiny_model(tiny_tokenizer()), ids, mask, [vis, None])


def test_image_rows_are_never_cut_from_the_left(vlm_dirs, tmp_path):
    from copsd.config import DistillConfig
    from copsd.distill import Distiller

    cfg = DistillConfig(model_name_or_path=vlm_dirs["qwen2_5_vl"], output_dir=str(tmp_path / "o"),
                        dataset=image_dataset(tmp_path / "d"), teacher_mode="initial",
                        constitution=write_constitution(tmp_path), num_generations=2, per_device_train_batch_size=2,
                        max_completion_length=4, max_prompt_length=12, disable_tqdm=True)
    with pytest.raises(ValueError) as e:
        Distiller(cfg)
    msg = str(e.value)
    for line in (1, 2, 3, 4):
        assert f"prompts.jsonl line {line}: the student-view prompt (" in msg
    assert msg.count("a row with images is never cut") == 4
