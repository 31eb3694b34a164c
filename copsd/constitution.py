"""The constitution: a versioned, hashed text placed in the teacher's user turn.

File formats
------------
* YAML: ``default: <text>`` (required), ``categories: {name: text}`` (optional), ``version`` (optional).
* Markdown: everything before the first ``## category: <name>`` heading is the default text; each such
  heading starts that category's text.  A leading level-1 title (``# My constitution``) names the
  document and is not sent to the teacher unless ``include_title=True`` (config ``constitution_title``).

Categories
----------
A row's ``category`` selects its category text.  With ``category_mode="replace"`` (the default) that text
is sent instead of the default text; with ``"extend"`` the default text is sent followed by it.  When the
constitution defines categories, a row category that is not one of them (or differs only in case) is an
error, never a silent fallback to the default; a constitution without categories treats ``category`` as a
label for metrics only.

The hash (``sha256``) is over what can be sent: default text, categories, version, and the mode and title
when they are not the defaults.

In either format a category text may contain ``{default}``: it is replaced by the default text when the
file is loaded, so a category can add its own guidance before or after the shared protocol without
repeating it.  :data:`DEFAULT_CONSTITUTION` is the bundled default (``copsd/data/constitutions/default.md``),
used when a config names no constitution.

Views
-----
The *student view* of a prompt is the conversation as given.  The *teacher view* is the same
conversation with the last user turn's content replaced by ``teacher_template`` filled with the
constitution and the query (by default the query is set off by ``---`` separators, after the
constitution).  Both are rendered by ``tokenizer.apply_chat_template``; the system prompt and the
assistant header are the template's own, and the sampled response is appended unchanged.

Rows with images (a vision-language model; the last user turn's content is a list of ``{"type": "image"}`` /
``{"type": "text"}`` parts): the template is split at ``{query}``; what comes before it (the constitution and
the separator, by default) becomes a text part placed *before* the images and the query, what comes after it a
text part after them.  So the constitution stays a token prefix shared by every prompt that starts the same
way.  The student view keeps the parts as given.  ``image_tokens`` (the count of each image's tokens, from
the image processor) expands the template's one image token per image exactly as the processor does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field

import yaml

DEFAULT_TEMPLATE = "{constitution}\n\n---\n\n{query}\n\n---"
DEFAULT_CONSTITUTION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "constitutions", "default.md")
_CATEGORY_HEADING = re.compile(r"^##\s+category:\s*(\S.*?)\s*$", re.IGNORECASE)
_TITLE = re.compile(r"^#\s+(\S.*?)\s*$")
_PLACEHOLDER = re.compile(r"\{(constitution|query)\}")


@dataclass
class Constitution:
    default: str
    categories: dict[str, str] = field(default_factory=dict)
    version: str = ""
    path: str = ""
    title: str = ""
    category_mode: str = "replace"

    @property
    def sha256(self) -> str:
        """Hash of the content (default + categories + version), independent of the file format."""
        content = {"default": self.default, "categories": self.categories, "version": self.version}
        if self.category_mode != "replace":
            content["category_mode"] = self.category_mode
        blob = json.dumps(content, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def check_category(self, category: str | None) -> str | None:
        """An error message for a row category this constitution does not define, else None."""
        if not category or not self.categories or category in self.categories:
            return None
        near = [c for c in self.categories if c.lower() == category.lower()]
        hint = f" (did you mean {near[0]!r}? categories are case-sensitive)" if near else ""
        return (f"category {category!r} is not defined in the constitution{hint}; defined: "
                f"{sorted(self.categories)}")

    def text_for(self, category: str | None = None, override: str | None = None) -> str:
        """The text for a row: its own override, else its category's text (replacing or extending the
        default, ``category_mode``), else the default.  An undefined category is a ValueError."""
        if override:
            return override
        if category and self.categories:
            problem = self.check_category(category)
            if problem:
                raise ValueError(problem)
            text = self.categories[category]
            return f"{self.default}\n\n{text}" if self.category_mode == "extend" else text
        return self.default

    def all_texts(self) -> list[str]:
        return [self.default, *self.categories.values()]

    def to_dict(self) -> dict:
        return {"default": self.default, "categories": dict(self.categories), "version": self.version,
                "sha256": self.sha256, "path": self.path, "title": self.title, "category_mode": self.category_mode}


CATEGORY_MODES = ("replace", "extend")


def load_constitution(path: str, *, category_mode: str = "replace", include_title: bool = False) -> Constitution:
    """Read a Markdown or YAML constitution (see the module docstring)."""
    if category_mode not in CATEGORY_MODES:
        raise ValueError(f"category_mode must be one of {CATEGORY_MODES}, got {category_mode!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"constitution file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    ext = os.path.splitext(path)[1].lower()
    if ext in (".yaml", ".yml"):
        c = _from_yaml(text, path)
    elif ext in (".md", ".markdown", ".txt"):
        c = _from_markdown(text, path)
    else:
        raise ValueError(f"constitution file {path}: expected a .md or .yaml file, got extension {ext!r}")
    c.categories = {k: v.replace("{default}", c.default) for k, v in c.categories.items()}
    c.path = path
    c.category_mode = category_mode
    if c.title and include_title:
        c.default = f"# {c.title}\n\n{c.default}"
    return c


def _from_yaml(text: str, path: str) -> Constitution:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"constitution file {path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"constitution file {path}: expected a mapping with a 'default' key")
    unknown = set(data) - {"default", "categories", "version"}
    if unknown:
        raise ValueError(f"constitution file {path}: unknown key(s) {sorted(unknown)}; "
                         "expected 'default', 'categories', 'version'")
    default = data.get("default")
    if not isinstance(default, str) or not default.strip():
        raise ValueError(f"constitution file {path}: 'default' must be a non-empty string")
    cats = data.get("categories") or {}
    if not isinstance(cats, dict):
        raise ValueError(f"constitution file {path}: 'categories' must map category names to texts")
    for k, v in cats.items():
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"constitution file {path}: category {k!r} must be a non-empty string")
    return Constitution(default=default.strip(), categories={str(k): v.strip() for k, v in cats.items()},
                        version=str(data.get("version", "")))


def _from_markdown(text: str, path: str) -> Constitution:
    default_lines: list[str] = []
    cats: dict[str, list[str]] = {}
    current = None
    for lineno, line in enumerate(text.splitlines(), 1):
        m = _CATEGORY_HEADING.match(line)
        if m:
            current = m.group(1)
            if current in cats:
                raise ValueError(f"constitution file {path} line {lineno}: category {current!r} defined twice")
            cats[current] = []
            continue
        (default_lines if current is None else cats[current]).append(line)
    title = ""
    first = next((i for i, line in enumerate(default_lines) if line.strip()), None)
    if first is not None:
        m = _TITLE.match(default_lines[first])
        if m:
            title = m.group(1)
            default_lines = default_lines[first + 1:]
    default = "\n".join(default_lines).strip()
    if not default:
        raise ValueError(f"constitution file {path}: no default text before the first '## category:' heading")
    categories = {}
    for k, lines in cats.items():
        body = "\n".join(lines).strip()
        if not body:
            raise ValueError(f"constitution file {path}: category {k!r} has no text")
        categories[k] = body
    return Constitution(default=default, categories=categories, title=title)


# --------------------------------------------------------------------------- views

def fill_template(template: str, constitution_text: str, query: str) -> str:
    """One pass over the template, so braces inside the constitution or query are left alone."""
    return _PLACEHOLDER.sub(lambda m: constitution_text if m.group(1) == "constitution" else query, template)


def teacher_messages(messages: list[dict], constitution_text: str, template: str = DEFAULT_TEMPLATE) -> list[dict]:
    """The conversation with the constitution placed in the last user turn, before the query (and, for a
    content list of parts, before its images: see the module docstring)."""
    idx = _last_user_index(messages)
    out = [dict(m) for m in messages]
    content = messages[idx]["content"]
    if isinstance(content, str):
        out[idx]["content"] = fill_template(template, constitution_text, content)
        return out
    before, _, after = template.partition("{query}")
    query_text = "".join(p.get("text", "") for p in content if p.get("type") == "text")
    head = fill_template(before, constitution_text, query_text)
    tail = fill_template(after, constitution_text, query_text)
    out[idx]["content"] = ([{"type": "text", "text": head}] if head else []) + [dict(p) for p in content] + \
        ([{"type": "text", "text": tail}] if tail else [])
    return out


def _last_user_index(messages: list[dict]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            content = messages[i].get("content")
            if not isinstance(content, str) and not (
                    isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in ("text", "image")
                                                      for p in content)):
                raise ValueError("the last user message's 'content' must be a string or a list of "
                                 "{'type': 'text' | 'image'} parts")
            return i
    raise ValueError("the prompt has no user message to put the query and constitution in")


def require_chat_template(tokenizer):
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"tokenizer {name!r} has no chat template; copsd renders the teacher and student "
                         "views with tokenizer.apply_chat_template (set tokenizer.chat_template, or use an "
                         "instruct model's tokenizer)")


def render_ids(tokenizer, messages: list[dict], *, add_generation_prompt: bool,
               image_tokens: list[int] | None = None) -> list[int]:
    """Token ids of ``messages`` rendered by the chat template; with ``image_tokens`` (a VLM row), the k-th
    image token is repeated ``image_tokens[k]`` times, as the processor does (``copsd.vlm``)."""
    require_chat_template(tokenizer)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if image_tokens is None:
        return ids
    from copsd.vlm import IMAGE_TOKEN, expand_image_tokens

    token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
    return expand_image_tokens(ids, tokenizer.convert_tokens_to_ids(token), image_tokens)


def render_views(tokenizer, messages, constitution_text, template=DEFAULT_TEMPLATE,
                 image_tokens: list[int] | None = None) -> tuple[list[int], list[int]]:
    """(student prompt ids, teacher prompt ids), each ending with the assistant header."""
    student = render_ids(tokenizer, messages, add_generation_prompt=True, image_tokens=image_tokens)
    teacher = render_ids(tokenizer, teacher_messages(messages, constitution_text, template),
                         add_generation_prompt=True, image_tokens=image_tokens)
    return student, teacher


def _response_part(tokenizer, messages, response_text, view, image_tokens=None):
    prompt = render_ids(tokenizer, messages, add_generation_prompt=True, image_tokens=image_tokens)
    full = render_ids(tokenizer, messages + [{"role": "assistant", "content": response_text}],
                      add_generation_prompt=False, image_tokens=image_tokens)
    if full[:len(prompt)] != prompt:
        at = next(i for i, (a, b) in enumerate(zip(prompt, full)) if a != b) if any(
            a != b for a, b in zip(prompt, full)) else min(len(prompt), len(full))
        raise ValueError(
            f"chat template is not prefix-consistent in the {view} view: the prompt rendered with "
            f"add_generation_prompt=True differs from the full conversation at token {at} "
            f"({tokenizer.convert_ids_to_tokens(prompt[at:at + 3])} vs "
            f"{tokenizer.convert_ids_to_tokens(full[at:at + 3])}); responses would be scored after a different "
            "header than they were sampled with")
    return full[len(prompt):]


def check_view_consistency(tokenizer, messages, response_text, constitution_text, template=DEFAULT_TEMPLATE,
                           image_tokens: list[int] | None = None):
    """Fail unless the response renders to identical token ids after the student and teacher prompts.

    Catches chat-template / ``<think>`` boundary differences that would give the teacher a
    different response than the student sampled.  Returns the response ids.
    """
    s = _response_part(tokenizer, messages, response_text, "student", image_tokens)
    t = _response_part(tokenizer, teacher_messages(messages, constitution_text, template), response_text,
                       "teacher", image_tokens)
    if s != t:
        at = next((i for i, (a, b) in enumerate(zip(s, t)) if a != b), min(len(s), len(t)))
        raise ValueError(
            "view-consistency check failed: the response renders to different token ids in the student and "
            f"teacher views, first at response token {at}: student {tokenizer.convert_ids_to_tokens(s[at:at + 4])} "
            f"vs teacher {tokenizer.convert_ids_to_tokens(t[at:at + 4])}")
    return s
