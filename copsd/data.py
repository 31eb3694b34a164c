"""Prompt rows and SFT rows, from local files, Hugging Face ``datasets`` or Python lists.

Sources (``dataset:``, ``sft_dataset:``): a JSONL file (errors name the file and line), a JSON file (JSON
lines or one array), a Parquet file, a directory of such files or one written by ``Dataset.save_to_disk``
(``dir:split`` picks a split), a ``datasets.Dataset`` / ``DatasetDict`` object or a list of dicts (Python
API), or a hub dataset name (``name:split``, default split ``train``) where a network exists.

Prompt rows, in the formats TRL uses:

* ``{"prompt": "text"}`` or ``{"prompt": [messages]}`` (prompt-only, standard or conversational);
* ``{"prompt": ..., "completion": "text" | [assistant messages]}`` (prompt-completion): the completion
  becomes the row's ``reference`` answer;
* ``{"messages": [...]}`` (conversational): the prompt is everything up to the last user message, the
  assistant messages after it (if any; joined, like a completion's) the ``reference``.

Optional keys: ``kind`` (``harmful``, ``benign`` or ``general``; default ``general``, see below), ``category``
(selects a category text of the constitution), ``reference`` (a safe answer, used for harmful rows in
Stage 1), ``constitution`` (overrides the constitution text for that row), ``reward`` (``token`` or
``judge``: the row's reward under the ``hybrid`` objective), ``id``.  Other columns are ignored
with one warning naming them.

``kind`` says what Stage 1 does with a row and how metrics are split: ``harmful`` rows are answered by
their ``reference`` (or a ``frontier_model``), ``benign`` and ``general`` rows by the student's own sampled
answer; refusal rates are reported per kind (a benign refusal is over-refusal).  A row without ``kind``
is ``general`` (an ordinary request with no safety label): that keeps a plain TRL prompt set usable
unchanged; label the harmful ones.

SFT rows: ``{"messages": [..., assistant]}`` or ``{"prompt": ..., "completion": ...}``.

Rows with images (vision-language models, TRL's format): a message ``content`` may be a list of parts,
``{"type": "image"}`` and ``{"type": "text", "text": ...}``, and the row's ``images`` column holds one image per
image part, in the order the parts appear in the conversation: a file path (relative to the dataset file's
directory, or absolute), a PIL image (a ``datasets`` Image column) or a ``{"bytes"|"path"}`` dict.  A content
list without image parts is read as the concatenation of its text parts.  Every image is opened when the rows
are read; a missing or unreadable image, or a count of images that differs from the image parts, is reported
with the row's file and line, together with every other problem.

Every row is checked; all malformed rows are reported at once, each with its file and line (or row).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

logger = logging.getLogger("copsd")

KINDS = ("harmful", "benign", "general")
DEFAULT_KIND = "general"
ROLES = ("system", "user", "assistant")
PROMPT_KEYS = {"prompt", "messages", "completion", "kind", "category", "reference", "constitution", "id", "reward",
               "images"}
REWARD_TYPES = ("token", "judge")
SFT_KEYS = {"messages", "prompt", "completion", "kind", "category", "source", "constitution", "id", "truncated",
            "images"}
PART_TYPES = ("text", "image")
DATA_EXTENSIONS = (".jsonl", ".json", ".parquet")
MAX_REPORTED = 30


@dataclass
class PromptRow:
    messages: list[dict]
    kind: str
    category: str | None = None
    reference: str | None = None
    constitution: str | None = None
    where: str = ""
    reward: str | None = None     # "token" / "judge": the row's reward under the hybrid objective
    images: list | None = None    # one per image part: absolute path, PIL image or datasets image dict

    def to_json(self) -> dict:
        d = {"prompt": self.messages, "kind": self.kind}
        for k in ("category", "reference", "constitution", "reward", "images"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d


@dataclass
class SFTRow:
    messages: list[dict]
    meta: dict = field(default_factory=dict)
    where: str = ""
    images: list | None = None    # as PromptRow.images


def message_text(content) -> str:
    """The text of a message ``content``: the string itself, or its text parts joined (images left out)."""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def image_parts(messages) -> int:
    """Number of ``{"type": "image"}`` parts in a conversation."""
    return sum(1 for m in messages if isinstance(m.get("content"), list)
               for p in m["content"] if p.get("type") == "image")


def looks_local(path: str) -> bool:
    """A path a user means as a local file or directory (never a hub id): absolute, ``./``, ``../``, ``~``,
    a backslash, more than one ``/``, or a first component that exists here (``out/teacher`` with ``out/``)."""
    if path.startswith(("/", "./", "../", "~", ".\\")) or "\\" in path or path in (".", ".."):
        return True
    parts = path.split("/")
    return len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


def _is_hf_dataset(obj) -> bool:
    return type(obj).__module__.split(".")[0] == "datasets"


def _import_datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{what} needs the 'datasets' package (pip install datasets)") from None
    return datasets


def _dataset_rows(ds):
    """The rows of a ``datasets.Dataset``; with an ``images`` column, read through the Arrow format so images stay
    encoded (``{"bytes", "path"}`` dicts, opened when used): decoded PIL images would hold every picture of the
    data set in memory for the whole run."""
    if "images" not in (getattr(ds, "features", None) or {}):
        yield from ds
        return
    for batch in ds.with_format("arrow").iter(batch_size=256):
        yield from batch.to_pylist()


def _split_of(ds, name: str, split: str):
    datasets = _import_datasets(name)
    if isinstance(ds, (datasets.DatasetDict, dict)):
        split = split or "train"
        if split not in ds:
            raise ValueError(f"dataset {name!r} has no split {split!r}; splits: {list(ds)}")
        ds = ds[split]
    return ds


def _json_file(path: str):
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json") and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        for i, rec in enumerate(data):
            yield f"{path} row {i}", rec, base
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path} line {lineno}", _BadJSON(f"invalid JSON ({e.msg} at column {e.colno})"), base
            continue
        yield f"{path} line {lineno}", rec, base


class _BadJSON:
    def __init__(self, message):
        self.message = message


def _file_records(path: str):
    if path.endswith(".parquet"):
        datasets = _import_datasets(f"dataset {path} (Parquet)")
        ds = datasets.load_dataset("parquet", data_files=path, split="train")
        base = os.path.dirname(os.path.abspath(path))
        for i, rec in enumerate(_dataset_rows(ds)):
            yield f"{path} row {i}", rec, base
        return
    yield from _json_file(path)


def _records(source):
    """Yield ``(where, record, base directory of relative image paths)`` from any source the module docstring
    lists."""
    if isinstance(source, (list, tuple)):
        for i, rec in enumerate(source):
            yield f"row {i}", rec, os.getcwd()
        return
    if _is_hf_dataset(source):
        ds = _split_of(source, "dataset object", "")
        for i, rec in enumerate(_dataset_rows(ds)):
            yield f"dataset row {i}", rec, os.getcwd()
        return
    if not isinstance(source, str):
        raise ValueError(f"dataset must be a path, a dataset name, a datasets.Dataset or a list of rows, "
                         f"got {type(source).__name__}")
    if os.path.isfile(source):
        if not source.endswith(DATA_EXTENSIONS):
            raise ValueError(f"dataset file {source}: expected a .jsonl, .json or .parquet file")
        yield from _file_records(source)
        return
    name, _, split = source.rpartition(":") if ":" in source and not os.path.exists(source) else (source, "", "")
    if os.path.isdir(name):
        if any(os.path.isfile(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json")):
            datasets = _import_datasets(f"dataset directory {name} (written by save_to_disk)")
            ds = _split_of(datasets.load_from_disk(name), name, split)
            for i, rec in enumerate(_dataset_rows(ds)):
                yield f"{name} row {i}", rec, os.path.abspath(name)
            return
        files = sorted(os.path.join(root, f) for root, _, fs in os.walk(name) for f in fs
                       if f.endswith(DATA_EXTENSIONS))
        if split:
            files = [f for f in files if os.path.basename(f).split(".")[0].split("-")[0] == split]
        if not files:
            raise FileNotFoundError(f"dataset directory {name} holds no .jsonl, .json or .parquet file"
                                    + (f" for split {split!r}" if split else ""))
        for f in files:
            yield from _file_records(f)
        return
    if source.endswith(DATA_EXTENSIONS) or looks_local(source):
        raise FileNotFoundError(f"dataset file not found: {source}")
    datasets = _import_datasets(f"dataset {source!r} (not a local file: read as a Hugging Face hub name)")
    ds = _split_of(datasets.load_dataset(name), name, split)
    for i, rec in enumerate(_dataset_rows(ds)):
        yield f"{name} row {i}", rec, os.getcwd()


def _check_parts(parts, where, label):
    """A list content checked part by part; without image parts it becomes its joined text."""
    out = []
    for k, p in enumerate(parts):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind not in PART_TYPES:
            raise ValueError(f"{where}: {label}[{k}] must be {{\"type\": \"image\"}} or {{\"type\": \"text\", "
                             f"\"text\": str}}, got {p!r}")
        if kind == "text":
            if not isinstance(p.get("text"), str):
                raise ValueError(f"{where}: {label}[{k}] is a text part without a string 'text'")
            out.append({"type": "text", "text": p["text"]})
        else:
            if p.get("image") is not None or p.get("url") is not None or p.get("path") is not None:
                raise ValueError(f"{where}: {label}[{k}]: put the image in the row's 'images' column and leave "
                                 "the part as {\"type\": \"image\"}")
            out.append({"type": "image"})
    if not any(p["type"] == "image" for p in out):
        return "".join(p["text"] for p in out)
    return out


def _check_messages(messages, where, key):
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: '{key}' must be a non-empty list of messages or a string")
    out = []
    for j, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(content, (str, list)):
            raise ValueError(f"{where}: '{key}'[{j}] must be {{\"role\": one of {ROLES}, \"content\": str or a "
                             f"list of parts}}, got {m!r}")
        if isinstance(content, list):
            content = _check_parts(content, where, f"'{key}'[{j}].content")
        out.append({"role": m["role"], "content": content})
    return out


def _row_images(rec, messages, where, base):
    """The row's images (absolute paths or in-memory images), each opened once; None for a text row."""
    from copsd.vlm import open_image

    wanted = image_parts(messages)
    images = rec.get("images")
    if images is None:
        images = []
    if not isinstance(images, (list, tuple)):
        images = [images]
    if wanted != len(images):
        raise ValueError(f"{where}: the conversation has {wanted} image part(s) ({{\"type\": \"image\"}}) but "
                         f"'images' holds {len(images)} image(s)")
    if not wanted:
        return None
    out = []
    for k, img in enumerate(images):
        if isinstance(img, str):
            if not img.strip():
                raise ValueError(f"{where}: images[{k}] is an empty path")
            img = img if os.path.isabs(img) else os.path.normpath(os.path.join(base or os.getcwd(), img))
        elif img is None:
            raise ValueError(f"{where}: images[{k}] is null")
        elif isinstance(img, dict) and not img.get("bytes") and isinstance(img.get("path"), str) \
                and not os.path.isabs(img["path"]):
            path = os.path.normpath(os.path.join(base or os.getcwd(), img["path"]))
            if not os.path.exists(path) and os.path.exists(img["path"]):
                # a `datasets` Image column written without its bytes (e.g. `to_parquet` of images opened from
                # relative paths) holds the path as given when it was built: `datasets` opens it from the working
                # directory, so copsd does too when it is not beside the data set
                path = os.path.abspath(img["path"])
            img = {"bytes": None, "path": path}
        open_image(img, f"{where}: images[{k}]")  # decodable now, or reported before step 1
        out.append(img)
    return out


def _as_messages(value, where, key, role):
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: '{key}' is empty")
        return [{"role": role, "content": value}]
    return _check_messages(value, where, key)


def _check_record(rec, where: str, allowed, ignored: set):
    if isinstance(rec, _BadJSON):
        raise ValueError(f"{where}: {rec.message}")
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    ignored.update(k for k in rec if k not in allowed)


def _present(rec, key):
    return rec.get(key) is not None


def parse_prompt_row(rec, where: str, default_kind: str = DEFAULT_KIND, ignored: set | None = None,
                     base: str | None = None) -> PromptRow:
    _check_record(rec, where, PROMPT_KEYS, set() if ignored is None else ignored)
    reference = rec.get("reference")
    if _present(rec, "messages"):
        if _present(rec, "prompt"):
            raise ValueError(f"{where}: give either 'prompt' or 'messages', not both")
        msgs = _check_messages(rec["messages"], where, "messages")
        last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
        if last_user is None:
            raise ValueError(f"{where}: 'messages' has no user message")
        after = [m for m in msgs[last_user + 1:] if m["role"] == "assistant"]
        if image_parts(msgs[last_user + 1:]):
            raise ValueError(f"{where}: image parts after the last user message (only prompts carry images)")
        if reference is None and after:  # every assistant turn after it, joined, as a completion's are
            reference = "".join(message_text(m["content"]) for m in after)
        messages = msgs[:last_user + 1]
    elif _present(rec, "prompt"):
        messages = _as_messages(rec["prompt"], where, "prompt", "user")
    else:
        raise ValueError(f"{where}: missing key 'prompt' (or 'messages')")
    if messages[-1]["role"] != "user":
        raise ValueError(f"{where}: the prompt's last message must have role 'user', got {messages[-1]['role']!r}")
    if _present(rec, "completion"):
        completion = _as_messages(rec["completion"], where, "completion", "assistant")
        if image_parts(completion):
            raise ValueError(f"{where}: 'completion' has image parts (only prompts carry images)")
        if reference is None:
            reference = "".join(message_text(m["content"]) for m in completion if m["role"] == "assistant")
    kind = rec.get("kind")
    kind = default_kind if kind is None else kind
    if kind not in KINDS:
        raise ValueError(f"{where}: 'kind' must be one of {KINDS}, got {kind!r}")
    for k in ("category", "reference", "constitution"):
        if rec.get(k) is not None and not isinstance(rec[k], str):
            raise ValueError(f"{where}: '{k}' must be a string, got {type(rec[k]).__name__}")
    if rec.get("reward") is not None and rec["reward"] not in REWARD_TYPES:
        raise ValueError(f"{where}: 'reward' must be one of {REWARD_TYPES}, got {rec['reward']!r}")
    images = _row_images(rec, messages, where, base)
    return PromptRow(messages=messages, kind=kind, category=rec.get("category"), reference=reference or None,
                     constitution=rec.get("constitution"), where=where, reward=rec.get("reward"), images=images)


def parse_sft_row(rec, where: str, ignored: set | None = None, base: str | None = None) -> SFTRow:
    _check_record(rec, where, SFT_KEYS, set() if ignored is None else ignored)
    if _present(rec, "messages"):
        if _present(rec, "prompt") or _present(rec, "completion"):
            raise ValueError(f"{where}: give either 'messages' or 'prompt' + 'completion', not both")
        messages = _check_messages(rec["messages"], where, "messages")
    elif _present(rec, "prompt") and _present(rec, "completion"):
        messages = (_as_messages(rec["prompt"], where, "prompt", "user")
                    + _as_messages(rec["completion"], where, "completion", "assistant"))
    else:
        raise ValueError(f"{where}: missing key 'messages' (or 'prompt' and 'completion')")
    if messages[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in messages):
        raise ValueError(f"{where}: 'messages' must contain a user turn and end with an assistant turn")
    if not isinstance(messages[-1]["content"], str):
        raise ValueError(f"{where}: the final assistant turn must be text (no image parts)")
    images = _row_images(rec, messages, where, base)
    meta = {k: rec[k] for k in rec
            if k in SFT_KEYS - {"messages", "prompt", "completion", "images"} and rec[k] is not None}
    return SFTRow(messages=messages, meta=meta, where=where, images=images)


def report_problems(what: str, problems: list[str]) -> ValueError:
    """One error listing every problem (the first ``MAX_REPORTED``), each starting with its file and line."""
    shown = problems[:MAX_REPORTED]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    if len(problems) == 1:
        return ValueError(problems[0])
    return ValueError(f"{len(problems)} problems in {what}:\n  " + "\n  ".join(shown) + more)


def _load(source, parse, what, problems=None):
    rows, found, ignored = [], [], set()
    for where, rec, base in _records(source):
        try:
            rows.append(parse(rec, where, ignored, base))
        except ValueError as e:
            found.append(str(e))
    name = source if isinstance(source, str) else type(source).__name__
    if problems is not None:  # the caller adds its own checks and reports everything at once
        problems.extend(found)
        if found:
            return rows
    elif found:
        raise report_problems(f"dataset {name}", found)
    if ignored:
        logger.warning("dataset %s: ignoring column(s) %s (%s rows use %s)", name, sorted(ignored), what,
                       sorted(PROMPT_KEYS if what == "prompt" else SFT_KEYS))
    if not rows:
        raise ValueError(f"dataset {name!r} has no rows")
    return rows


def load_prompt_rows(source, default_kind: str = DEFAULT_KIND, problems: list | None = None) -> list[PromptRow]:
    """The rows of ``source``; a ValueError listing every malformed row, or, with ``problems``, the well-formed
    rows with the messages about the others appended to ``problems``."""
    if default_kind not in KINDS:
        raise ValueError(f"default_kind must be one of {KINDS}, got {default_kind!r}")
    return _load(source, lambda rec, where, ign, base: parse_prompt_row(rec, where, default_kind, ign, base),
                 "prompt", problems)


def load_sft_rows(source, problems: list | None = None) -> list[SFTRow]:
    return _load(source, parse_sft_row, "SFT", problems)


def write_jsonl(path: str, records) -> None:
    """Write atomically (temp file + rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def bundled(name: str) -> str:
    """Path of a file shipped in ``copsd/data/`` (the tiny constitution and data set used by tests)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no bundled file {name!r} in {os.path.dirname(path)}")
    return path
