"""Prompt rows and SFT rows, from JSONL files or Hugging Face ``datasets``.

Prompt row: ``{"prompt": [messages] | str, "kind": "harmful"|"benign"|"general", "category"?: str,
"reference"?: str, "constitution"?: str, "reward"?: "token"|"judge"}`` (``constitution`` overrides the
constitution text for that row; ``reward`` picks the row's reward under the ``hybrid`` objective).
SFT row: ``{"messages": [{"role", "content"}, ...]}`` ending with an assistant message.
A malformed row is a ``ValueError`` naming the file and line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

KINDS = ("harmful", "benign", "general")
ROLES = ("system", "user", "assistant")
PROMPT_KEYS = {"prompt", "kind", "category", "reference", "constitution", "id", "reward"}
REWARD_TYPES = ("token", "judge")
SFT_KEYS = {"messages", "kind", "category", "source", "constitution", "id"}


@dataclass
class PromptRow:
    messages: list[dict]
    kind: str
    category: str | None = None
    reference: str | None = None
    constitution: str | None = None
    where: str = ""
    reward: str | None = None

    def to_json(self) -> dict:
        d = {"prompt": self.messages, "kind": self.kind}
        for k in ("category", "reference", "constitution", "reward"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d


@dataclass
class SFTRow:
    messages: list[dict]
    meta: dict = field(default_factory=dict)
    where: str = ""


def _records(source):
    """Yield ``(where, record)`` from a JSONL path, a ``datasets`` dataset/name, or a list of dicts."""
    if isinstance(source, (list, tuple)):
        for i, rec in enumerate(source):
            yield f"row {i}", rec
        return
    if not isinstance(source, str):
        raise ValueError(f"dataset must be a path or a list of rows, got {type(source).__name__}")
    if source.endswith((".jsonl", ".json")) or os.path.isfile(source):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"dataset file not found: {source}")
        with open(source, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{source} line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
                yield f"{source} line {lineno}", rec
        return
    try:
        import datasets
    except ImportError:
        raise ValueError(f"dataset {source!r} is not a JSONL file and the 'datasets' package is not installed "
                         "(pip install datasets to read Hugging Face datasets)") from None
    name, _, split = source.partition(":")
    if os.path.isdir(name):
        ds = datasets.load_from_disk(name)
    else:
        ds = datasets.load_dataset(name)
    if isinstance(ds, datasets.DatasetDict):
        split = split or "train"
        if split not in ds:
            raise ValueError(f"dataset {name!r} has no split {split!r}; splits: {list(ds)}")
        ds = ds[split]
    for i, rec in enumerate(ds):
        yield f"{name} row {i}", rec


def _check_messages(messages, where, key):
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: '{key}' must be a non-empty list of messages or a string")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: '{key}'[{j}] must be {{\"role\": one of {ROLES}, \"content\": str}}, "
                             f"got {m!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _check_record(rec, where: str, allowed, required: str, what: str):
    """A JSON object with only ``allowed`` keys and the ``required`` one."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    unknown = set(rec) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; {what} rows have {sorted(allowed)}")
    if required not in rec:
        raise ValueError(f"{where}: missing key '{required}'")


def parse_prompt_row(rec, where: str) -> PromptRow:
    _check_record(rec, where, PROMPT_KEYS, "prompt", "prompt")
    prompt = rec["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{where}: 'prompt' is empty")
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = _check_messages(prompt, where, "prompt")
    if messages[-1]["role"] != "user":
        raise ValueError(f"{where}: the prompt's last message must have role 'user', got {messages[-1]['role']!r}")
    kind = rec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{where}: 'kind' must be one of {KINDS}, got {kind!r}")
    for k in ("category", "reference", "constitution"):
        if rec.get(k) is not None and not isinstance(rec[k], str):
            raise ValueError(f"{where}: '{k}' must be a string, got {type(rec[k]).__name__}")
    if rec.get("reward") is not None and rec["reward"] not in REWARD_TYPES:
        raise ValueError(f"{where}: 'reward' must be one of {REWARD_TYPES}, got {rec['reward']!r}")
    return PromptRow(messages=messages, kind=kind, category=rec.get("category"), reference=rec.get("reference"),
                     constitution=rec.get("constitution"), where=where, reward=rec.get("reward"))


def parse_sft_row(rec, where: str) -> SFTRow:
    _check_record(rec, where, SFT_KEYS, "messages", "SFT")
    messages = _check_messages(rec["messages"], where, "messages")
    if messages[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in messages):
        raise ValueError(f"{where}: 'messages' must contain a user turn and end with an assistant turn")
    return SFTRow(messages=messages, meta={k: rec[k] for k in rec if k != "messages"}, where=where)


def load_prompt_rows(source) -> list[PromptRow]:
    rows = [parse_prompt_row(rec, where) for where, rec in _records(source)]
    if not rows:
        raise ValueError(f"dataset {source!r} has no rows")
    return rows


def load_sft_rows(source) -> list[SFTRow]:
    rows = [parse_sft_row(rec, where) for where, rec in _records(source)]
    if not rows:
        raise ValueError(f"dataset {source!r} has no rows")
    return rows


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
