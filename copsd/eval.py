"""``copsd eval``: did alignment work, and what did it cost?

For each model (optionally with a constitution in its user turn, the teacher view) and each
prompt row (``kind``: harmful / benign / general), sample ``num_samples`` responses and measure

* safety: refusal rate on harmful prompts (``harmful_refusal``);
* helpfulness: compliance (= 1 - refusal) on benign prompts, on the over-refusal-prone ones
  (``category == "over_refusal"``, XSTest-style) and on general prompts;
* contraction: mean response length (tokens, without the end token) and mean token entropy
  (nats, of the model's own next-token distribution at temperature 1 over the response);
* diversity: 1 - Self-BLEU over each prompt's samples, averaged over prompts;
* constitution leakage: fraction of responses repeating a long word n-gram of a constitution.

Refusals are judged by :mod:`copsd.textmetrics` (keyword detector by default, or a local
classifier / judge).  Every rate comes with a percentile bootstrap interval (``metrics_ci``), resampling
prompts (a prompt's samples are not independent), so two models can be told apart from noise.

With ``judge=`` (a local chat model, :mod:`copsd.judge`) the responses are also judged, as the paper
evaluates: pointwise safety (1-10, on harmful prompts) and helpfulness (1-10, on benign and general prompts)
and a pairwise win-rate of every model against ``baseline`` (each pair judged in both orders, so the
judge's position bias cancels), all with bootstrap intervals; malformed verdicts are counted and left out.
The paper decodes greedily with up to 512 new tokens (``temperature=0, max_new_tokens=512``, one sample per
prompt); the defaults here sample 4 responses at temperature 1, which diversity needs.

Outputs: ``report.json``, ``responses-<model>.jsonl``, a printed table and PNG plots (safety vs helpfulness,
length and entropy distributions).

A model with a constitution is evaluated in its teacher view, built as distillation builds it:
``teacher_template``, ``category_mode`` (a row's category text replaces or extends the default text) and
``constitution_title`` (send a Markdown constitution's title line).

Prompt rows with images (``copsd.data``) are evaluated on vision-language models (``copsd.vlm``) with their
images; a text-only model given such rows is an error naming the model.  The judge (``judge=``) reads text
only: for such a row it is told that the request came with images it cannot see
(:func:`copsd.judge.judge_query`), the count is logged as a warning and recorded in the report.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence

from copsd import textmetrics as tm

logger = logging.getLogger("copsd")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
METRICS = ("harmful_refusal", "benign_compliance", "over_refusal_compliance", "general_compliance",
           "mean_length", "benign_mean_length", "mean_token_entropy", "benign_mean_token_entropy",
           "diversity", "leak_rate")
TABLE_COLUMNS = (
    ("harmful_refusal", "harm.refuse", "{:.1%}"),
    ("benign_compliance", "benign.comply", "{:.1%}"),
    ("over_refusal_compliance", "overref.comply", "{:.1%}"),
    ("general_compliance", "general.comply", "{:.1%}"),
    ("benign_mean_length", "benign.len", "{:.1f}"),
    ("mean_length", "len", "{:.1f}"),
    ("benign_mean_token_entropy", "benign.H", "{:.3f}"),
    ("diversity", "diversity", "{:.3f}"),
    ("leak_rate", "leak", "{:.1%}"),
)


RATES = ("harmful_refusal", "benign_compliance", "over_refusal_compliance", "general_compliance", "leak_rate")


def resolve_decoding(greedy: bool, temperature: float, num_samples: int | None) -> tuple[float, int]:
    """(temperature, num_samples) of an evaluation: ``greedy`` means temperature 0; without an explicit
    ``num_samples`` a greedy evaluation takes 1 answer per prompt (all would be equal), sampling takes 4."""
    temperature = 0.0 if greedy else float(temperature)
    if num_samples is None:
        num_samples = 1 if temperature == 0 else 4
    return temperature, num_samples


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def _check_models(models) -> list[dict]:
    if isinstance(models, dict) or not isinstance(models, Sequence) or not models:
        raise ValueError("models: expected a non-empty list of {'name', 'path', 'constitution'?} dicts")
    out, names = [], set()
    for i, m in enumerate(models):
        if not isinstance(m, dict):
            raise ValueError(f"models[{i}]: expected a dict, got {type(m).__name__}")
        unknown = set(m) - {"name", "path", "constitution", "model", "tokenizer", "vision"}
        if unknown:
            raise ValueError(f"models[{i}]: unknown key(s) {sorted(unknown)}; expected name, path, constitution")
        name = m.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"models[{i}]: 'name' must be a non-empty string")
        if name in names:
            raise ValueError(f"models[{i}]: duplicate name {name!r}")
        names.add(name)
        if m.get("model") is None:
            path = m.get("path")
            if not isinstance(path, str) or not (os.path.isdir(path) or _HUB_ID.match(path)):
                raise ValueError(f"models[{i}] ({name}): 'path' must be a local model directory or a Hugging Face "
                                 f"model id already in the local cache, got {path!r}")
        if m.get("constitution") is not None and not os.path.isfile(m["constitution"]):
            raise ValueError(f"models[{i}] ({name}): constitution file not found: {m['constitution']!r}")
        out.append(dict(m))
    return out


def _load(entry, device, dtype):
    """(model, tokenizer, vision): ``vision`` is the ``copsd.vlm.VisionProcessor`` of a vision-language model
    (given as ``entry["vision"]`` or loaded from its path), else None."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from copsd import vlm

    tokenizer = entry.get("tokenizer")
    model = entry.get("model")
    vision = entry.get("vision")
    try:  # local_files_only: a hub id resolves from the local cache only, never the network
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(entry["path"], local_files_only=True, trust_remote_code=False)
            if not getattr(tokenizer, "chat_template", None):  # a VLM may keep it beside its processor
                tokenizer.chat_template = vlm._chat_template_file(entry["path"]) or tokenizer.chat_template
        if model is None:
            config = vlm.load_config(entry["path"], local_files_only=True)
            if vlm.is_vlm_config(config):
                model = vlm.load_vlm(entry["path"], dtype=dtype or torch.float32, local_files_only=True).to(device)
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    entry["path"], local_files_only=True, trust_remote_code=False, dtype=dtype or torch.float32
                ).to(device)
        if vision is None and vlm.is_vlm(model):
            if not entry.get("path"):
                raise ValueError(f"model {entry['name']!r}: a vision-language model given as 'model' needs "
                                 "'vision' (its copsd.vlm.VisionProcessor) or a 'path' to load it from")
            vision = vlm.load_vision_processor(entry["path"], tokenizer, key=f"model {entry['name']!r}",
                                               local_files_only=True)
    except OSError as e:
        raise ValueError(f"model {entry['name']!r}: cannot load {entry['path']!r} from local files ({e})") from None
    return model.eval(), tokenizer, vision


def _check_trained_view(entry, constitution) -> str | None:
    """The constitution hash a copsd-trained model recorded (``constitution.json``: constitution text, category
    mode and title line, as it trained), with a warning when the teacher view evaluated here differs."""
    path = os.path.join(entry["path"], "constitution.json") if isinstance(entry.get("path"), str) else ""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("sha256"), str):
        return None
    if recorded["sha256"] != constitution.sha256:
        logger.warning("eval: model %r was trained with constitution %s (category_mode %r), but is evaluated with "
                       "%s (%s, category_mode %r, title line %s): check --constitution, --category_mode and "
                       "--constitution_title", entry["name"], recorded["sha256"][:12], recorded.get("category_mode"),
                       constitution.sha256[:12], constitution.path, constitution.category_mode,
                       "sent" if constitution.title and constitution.default.startswith("# ") else "not sent")
    return recorded["sha256"]


def _stop_ids(model, tokenizer) -> list[int]:
    ids = []
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if src is None:
            continue
        ids += [src] if isinstance(src, int) else list(src)
    return sorted(set(ids))


def response_entropies(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], *,
                       batch_tokens: int = 8192, visions=None) -> list[list[float]]:
    """Per-token entropy (nats, temperature 1) of the model's next-token distribution at every
    position that produced a completion token.  Only the selected positions go through the
    lm_head, through ``copsd.ops.linear_logprobs`` (the model's logit scale and softcap, fp32
    statistics), so no ``[tokens, vocab]`` tensor is built.  ``visions``: each prompt's
    ``VisionInputs`` (or None) for a vision-language model."""
    import torch

    from copsd import _hf
    from copsd.ops import linear_logprobs

    base, head = _hf.decoder_and_head(model)
    scale, softcap = _hf.logit_transform(model.config)
    device = head.weight.device
    out: list[list[float]] = [[] for _ in prompt_ids]
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]) + len(completion_ids[i]))
    batch: list[int] = []

    def flush(idx):
        width = max(len(prompt_ids[i]) + len(completion_ids[i]) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            seq = list(prompt_ids[i]) + list(completion_ids[i])
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            if visions is not None:
                from copsd.vlm import hidden_states

                hidden = hidden_states(model, ids, mask, [visions[i] for i in idx], [len(prompt_ids[i]) for i in idx])
            else:
                hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state
            for r, i in enumerate(idx):
                n_p, n_c = len(prompt_ids[i]), len(completion_ids[i])
                if n_c == 0:
                    continue
                h = hidden[r, n_p - 1 : n_p - 1 + n_c]
                ids_c = torch.tensor(completion_ids[i], dtype=torch.long, device=device)
                _, ent, _ = linear_logprobs(h, head.weight, ids_c, logit_scale=scale, softcap=softcap,
                                            return_entropy=True)
                out[i] = ent.tolist()

    tokens = 0
    for i in order:
        n = len(prompt_ids[i]) + len(completion_ids[i])
        if batch and tokens + n > batch_tokens:
            flush(batch)
            batch, tokens = [], 0
        batch.append(i)
        tokens += n
    if batch:
        flush(batch)
    return out


def evaluate_model(entry: dict, rows, *, num_samples=4, max_new_tokens=64, temperature=1.0, top_p=1.0,
                   top_k=0, batch_size=32, seed=0, refusal_detector=None, leak_texts=None, leak_ngram=8,
                   teacher_template=None, category_mode="replace", constitution_title=False, device=None,
                   dtype=None, progress=True, n_boot=1000, ci_level=0.95) -> dict:
    """Generate and score one model on prompt rows (``copsd.data.PromptRow``); see the module doc.
    ``temperature=0`` decodes greedily.  With ``entry["constitution"]`` the prompts are the teacher view
    (``teacher_template``, ``category_mode``, ``constitution_title`` as in training)."""
    import torch
    from tqdm.auto import tqdm

    from copsd.constitution import DEFAULT_TEMPLATE, load_constitution, render_ids, teacher_messages
    from copsd.data import message_text
    from copsd.judge import bootstrap_ci
    from copsd.rollout import generate

    detector = refusal_detector or tm.KeywordRefusalDetector()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer, vision = _load(entry, device, dtype)
    constitution = (load_constitution(entry["constitution"], category_mode=category_mode,
                                      include_title=constitution_title) if entry.get("constitution") else None)
    trained_sha = _check_trained_view(entry, constitution) if constitution is not None else None
    template = teacher_template or DEFAULT_TEMPLATE

    prompt_ids, queries, visions = [], [], []
    for row in rows:
        messages = row.messages
        if constitution is not None:
            try:
                text = constitution.text_for(row.category, row.constitution)
            except ValueError as e:
                raise ValueError(f"{row.where}: model {entry['name']!r}: {e}") from None
            messages = teacher_messages(messages, text, template)
        v = None
        if row.images:
            if vision is None:
                raise ValueError(f"{row.where}: the row has images but model {entry['name']!r} is not a "
                                 "vision-language model")
            v = vision.encode(row.images, row.where)
        visions.append(v)
        prompt_ids.append(render_ids(tokenizer, messages, add_generation_prompt=True,
                                     image_tokens=vision.token_counts(v) if v is not None else None))
        queries.append(message_text(row.messages[-1]["content"]))
    if all(v is None for v in visions):
        visions = None

    stops = _stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    completions: list[list[int]] = []
    t0 = time.time()
    bar = tqdm(total=len(rows), desc=f"eval {entry['name']}", disable=not progress, unit="prompt")
    for a in range(0, len(rows), batch_size):
        extra = {"vision": visions[a : a + batch_size]} if visions is not None else {}
        roll = generate(model, prompt_ids[a : a + batch_size], num_generations=num_samples,
                        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                        eos_token_id=stops, pad_token_id=pad, generator=gen, **extra)
        completions.extend(roll.completion_ids)
        bar.update(min(batch_size, len(rows) - a))
    bar.close()
    gen_seconds = time.time() - t0

    sample_prompt = [i // num_samples for i in range(len(completions))]
    stop_set = set(stops)
    resp_ids = [[t for t in c if t not in stop_set] for c in completions]
    texts = [tokenizer.decode(c, skip_special_tokens=True).strip() for c in resp_ids]
    refused = detector([queries[p] for p in sample_prompt], texts)
    entropies = response_entropies(model, [prompt_ids[p] for p in sample_prompt], completions,
                                   visions=[visions[p] for p in sample_prompt] if visions is not None else None)
    leak_det = tm.ConstitutionLeakDetector(leak_texts, n=leak_ngram) if leak_texts else None
    leaks = leak_det(texts) if leak_det else [None] * len(texts)

    samples = []
    for j, text in enumerate(texts):
        row = rows[sample_prompt[j]]
        h = entropies[j]
        samples.append({"prompt_index": sample_prompt[j], "kind": row.kind, "category": row.category,
                        "query": queries[sample_prompt[j]], "response": text, "length": len(resp_ids[j]),
                        "mean_entropy": (sum(h) / len(h)) if h else None, "refusal": bool(refused[j]),
                        "leak": leaks[j], **({"images": len(row.images)} if row.images else {})})

    def subset(pred):
        return [j for j, s in enumerate(samples) if pred(s)]

    def tok_entropy(idx):  # token-weighted mean over the responses' tokens
        n = sum(len(entropies[j]) for j in idx)
        return sum(sum(entropies[j]) for j in idx) / n if n else None

    def rate(idx, key, invert=False):
        if not idx:
            return None
        r = sum(bool(samples[j][key]) for j in idx) / len(idx)
        return 1.0 - r if invert else r

    everything = list(range(len(samples)))
    harmful = subset(lambda s: s["kind"] == "harmful")
    benign = subset(lambda s: s["kind"] == "benign")
    over = subset(lambda s: s["kind"] == "benign" and s["category"] == "over_refusal")
    general = subset(lambda s: s["kind"] == "general")

    by_prompt: dict[int, list[str]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt_index"], []).append(s["response"])
    sb = {i: tm.self_bleu(v) for i, v in by_prompt.items() if len(v) >= 2}
    kinds = {}
    for kind, idx in (("harmful", harmful), ("benign", benign), ("general", general)):
        prompts_here = sorted({samples[j]["prompt_index"] for j in idx})
        kinds[kind] = {
            "n_prompts": len(prompts_here), "n_responses": len(idx),
            "refusal_rate": rate(idx, "refusal"), "mean_length": _mean([samples[j]["length"] for j in idx]),
            "mean_token_entropy": tok_entropy(idx),
            "diversity": _mean([1.0 - sb[i] for i in prompts_here if i in sb]),
            "leak_rate": rate(idx, "leak") if leak_det else None,
        }
    def rate_ci(idx, key, invert=False):
        vals = [(1.0 - float(bool(samples[j][key]))) if invert else float(bool(samples[j][key])) for j in idx]
        ci = bootstrap_ci(vals, [samples[j]["prompt_index"] for j in idx], n_boot=n_boot, alpha=1 - ci_level,
                          seed=seed)
        return list(ci) if ci else None

    metrics_ci = {
        "harmful_refusal": rate_ci(harmful, "refusal"),
        "benign_compliance": rate_ci(benign, "refusal", invert=True),
        "over_refusal_compliance": rate_ci(over, "refusal", invert=True),
        "general_compliance": rate_ci(general, "refusal", invert=True),
        "leak_rate": rate_ci(everything, "leak") if leak_det else None,
    }
    metrics = {
        "harmful_refusal": rate(harmful, "refusal"),
        "benign_compliance": rate(benign, "refusal", invert=True),
        "over_refusal_compliance": rate(over, "refusal", invert=True),
        "general_compliance": rate(general, "refusal", invert=True),
        "mean_length": _mean([s["length"] for s in samples]),
        "benign_mean_length": kinds["benign"]["mean_length"],
        "mean_token_entropy": tok_entropy(everything),
        "benign_mean_token_entropy": kinds["benign"]["mean_token_entropy"],
        "diversity": _mean([1.0 - v for v in sb.values()]),
        "leak_rate": rate(everything, "leak") if leak_det else None,
    }
    del model
    return {
        "name": entry["name"], "path": entry.get("path"), "constitution": entry.get("constitution"),
        "constitution_sha256": constitution.sha256 if constitution else None,
        **({"category_mode": category_mode, "constitution_title": constitution_title,
            "trained_constitution_sha256": trained_sha} if constitution else {}),
        "metrics": metrics, "metrics_ci": metrics_ci, "per_kind": kinds,
        "generation_seconds": round(gen_seconds, 2),
        "_samples": samples,
    }


def evaluate_models(models: list[dict], prompt_files: list[str], output_dir: str, *, num_samples: int = 4,
                    max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                    batch_size: int = 32, seed: int = 0, refusal_detector="keyword",
                    leak_constitutions: list[str] | None = None, leak_ngram: int = 8,
                    teacher_template: str | None = None, category_mode: str = "replace",
                    constitution_title: bool = False, device=None, dtype=None, progress: bool = True,
                    plots: bool = True, print_table: bool = True, judge=None, baseline: str | None = None,
                    judge_max_new_tokens: int = 128, judge_batch_size: int = 8, n_boot: int = 1000,
                    ci_level: float = 0.95) -> dict:
    """Evaluate every model on every prompt file and write ``output_dir/report.json`` (+ plots).

    ``models``: ``[{"name": str, "path": dir, "constitution": None | file}]`` (a loaded ``model`` and
    ``tokenizer`` may be given instead of ``path``).  ``refusal_detector``: ``"keyword"``,
    ``"classifier:PATH"``, ``"judge:PATH"``, a model directory, or any callable
    ``(prompts, responses) -> list[bool]``.  ``leak_constitutions``: the constitution files whose
    text counts as leaked (default: every constitution named in ``models``).  ``temperature=0``: greedy.
    ``teacher_template``, ``category_mode`` and ``constitution_title``: the teacher view of a model with a
    constitution, as the training configs' keys of those names.
    ``judge``: a local chat-model directory or a :class:`copsd.judge.Judge`; ``baseline``: the model
    the others are compared with pairwise (default: the first).  ``n_boot`` / ``ci_level``: the bootstrap
    intervals.  Returns the report.
    """
    from copsd.constitution import DEFAULT_TEMPLATE, load_constitution
    from copsd.data import load_prompt_rows

    models = _check_models(models)
    if isinstance(prompt_files, str) or not isinstance(prompt_files, Sequence) or not prompt_files:
        raise ValueError("prompt_files: expected a non-empty list of JSONL paths")
    for name, v in (("num_samples", num_samples), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size),
                    ("judge_max_new_tokens", judge_max_new_tokens), ("judge_batch_size", judge_batch_size),
                    ("n_boot", n_boot)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    if not isinstance(ci_level, float) or not 0 < ci_level < 1:
        raise ValueError(f"ci_level: expected a float in (0, 1), got {ci_level!r}")
    from copsd.constitution import CATEGORY_MODES

    if category_mode not in CATEGORY_MODES:
        raise ValueError(f"category_mode: expected one of {CATEGORY_MODES}, got {category_mode!r}")
    if not isinstance(constitution_title, bool):
        raise ValueError(f"constitution_title: expected true or false, got {constitution_title!r}")
    if teacher_template is not None and not (isinstance(teacher_template, str) and "{constitution}" in
                                             teacher_template and "{query}" in teacher_template):
        raise ValueError(f"teacher_template: must contain '{{constitution}}' and '{{query}}', got {teacher_template!r}")
    if not isinstance(output_dir, str) or not output_dir:
        raise ValueError("output_dir: expected a directory path")
    names = [m["name"] for m in models]
    if baseline is not None and baseline not in names:
        raise ValueError(f"baseline: no model named {baseline!r} (models: {names})")
    if judge is not None and not hasattr(judge, "pairwise"):
        if not (isinstance(judge, str) and os.path.isdir(judge)):
            raise ValueError(f"judge: expected a local model directory or a copsd.judge.Judge, got {judge!r}")
        from copsd.judge import check_judge_dir

        check_judge_dir(judge)  # before any model is evaluated: its weights are loaded after them
    rows = []
    for f in prompt_files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"prompt file not found: {f}")
        rows.extend(load_prompt_rows(f))
    for m in models:  # every row's category in every teacher view, before any model generates
        if m.get("constitution"):
            c = load_constitution(m["constitution"], category_mode=category_mode, include_title=constitution_title)
            for row in rows:
                problem = c.check_category(row.category) if not row.constitution else None
                if problem:
                    raise ValueError(f"{row.where}: model {m['name']!r}: {problem}")
    detector = refusal_detector if callable(refusal_detector) else tm.load_refusal_detector(refusal_detector)
    leak_files = leak_constitutions if leak_constitutions is not None else sorted(
        {m["constitution"] for m in models if m.get("constitution")})
    leak_texts = [t for f in leak_files for t in load_constitution(f, include_title=constitution_title).all_texts()]

    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir: {output_dir!r} exists and is not a directory")
    results = []  # output_dir is created once every model has been evaluated: a failed run leaves none behind
    for entry in models:
        res = evaluate_model(entry, rows, num_samples=num_samples, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, top_k=top_k, batch_size=batch_size, seed=seed,
                             refusal_detector=detector, leak_texts=leak_texts or None, leak_ngram=leak_ngram,
                             teacher_template=teacher_template, category_mode=category_mode,
                             constitution_title=constitution_title, device=device, dtype=dtype, progress=progress,
                             n_boot=n_boot, ci_level=ci_level)
        samples = res["_samples"]
        res["_lengths"] = [s["length"] for s in samples if s["kind"] != "harmful"]
        res["_entropies"] = [s["mean_entropy"] for s in samples if s["kind"] != "harmful" and s["mean_entropy"]]
        results.append(res)

    judge_settings = None
    if judge is not None:
        from copsd.judge import Judge

        if isinstance(judge, str):
            judge_path = judge
            judge = Judge.from_pretrained(judge, device=device, dtype=dtype, max_new_tokens=judge_max_new_tokens,
                                          batch_size=judge_batch_size)
        else:
            judge_path = getattr(getattr(judge.model, "config", None), "_name_or_path", None)
        base_name = baseline or names[0]
        with_images = sum(bool(r.images) for r in rows)
        if with_images:
            logger.warning("eval judge: %d of %d prompts have images; the judge reads text only and is told that "
                           "the request came with images it cannot see", with_images, len(rows))
        judge_results(judge, results, base_name, n_boot=n_boot, ci_level=ci_level, seed=seed, progress=progress)
        judge_settings = {"judge": judge_path, "baseline": base_name, "judge_max_new_tokens": judge.max_new_tokens,
                          "judge_decoding": "greedy", "judge_truncated_prompts": judge.truncated_prompts,
                          "prompts_with_images_judged_on_text": with_images}

    os.makedirs(output_dir, exist_ok=True)
    for res in results:
        samples = res.pop("_samples")
        fname = f"responses-{_slug(res['name'])}.jsonl"
        with open(os.path.join(output_dir, fname), "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")
        res["responses_file"] = fname

    report = {
        "prompt_files": list(prompt_files), "n_prompts": len(rows),
        "n_prompts_by_kind": {k: sum(r.kind == k for r in rows) for k in ("harmful", "benign", "general")},
        "settings": {"num_samples": num_samples, "max_new_tokens": max_new_tokens, "temperature": temperature,
                     "decoding": "greedy" if temperature == 0 else "sampling",
                     "top_p": top_p, "top_k": top_k, "seed": seed, "leak_ngram": leak_ngram,
                     "refusal_detector": refusal_detector if isinstance(refusal_detector, str)
                     else type(refusal_detector).__name__, "leak_constitutions": leak_files,
                     "teacher_view": {"template": teacher_template or DEFAULT_TEMPLATE,
                                      "category_mode": category_mode, "constitution_title": constitution_title},
                     "bootstrap": {"n_boot": n_boot, "ci_level": ci_level, "resampled": "prompts"},
                     **({"judge": judge_settings} if judge_settings else {})},
        "metrics": list(METRICS),
        "models": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
    }
    if plots:
        report["plots"] = write_plots(results, output_dir)
    path = os.path.join(output_dir, "report.json")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:  # written whole or not at all
        json.dump(report, f, indent=2)
    os.replace(tmp, path)
    if print_table:
        print(format_table(report))
        print()
        print(format_intervals(report))
    return report


def _summary(values, clusters, *, n_boot, ci_level, seed) -> dict:
    from copsd.judge import bootstrap_ci

    valid = [v for v in values if v is not None]
    ci = bootstrap_ci(values, clusters, n_boot=n_boot, alpha=1 - ci_level, seed=seed)
    return {"mean": sum(valid) / len(valid) if valid else None, "ci": list(ci) if ci else None,
            "n": len(valid), "malformed": len(values) - len(valid)}


def judge_results(judge, results: list[dict], baseline: str, *, n_boot=1000, ci_level=0.95, seed=0,
                  progress=True) -> None:
    """Add ``judge`` sections to ``results`` (from :func:`evaluate_model`, ``_samples`` kept) and judge fields
    to their samples: safety on harmful prompts, helpfulness on the others, win-rate against ``baseline``."""
    from tqdm.auto import tqdm

    from copsd.judge import judge_query

    by_name = {r["name"]: r for r in results}
    base = by_name[baseline]["_samples"]
    bar = tqdm(total=len(results), desc="judge", disable=not progress, unit="model")
    for res in results:
        samples = res["_samples"]
        section = {}
        for key, kinds, fn in (("safety", ("harmful",), judge.safety),
                               ("helpfulness", ("benign", "general"), judge.helpfulness)):
            idx = [j for j, s in enumerate(samples) if s["kind"] in kinds]
            out = fn([judge_query(samples[j]["query"], samples[j].get("images", 0)) for j in idx],
                     [samples[j]["response"] for j in idx])
            for j, v, t in zip(idx, out.values, out.texts):
                samples[j][f"judge_{key}"] = v
                samples[j][f"judge_{key}_raw"] = t
            section[key] = _summary(out.values, [samples[j]["prompt_index"] for j in idx], n_boot=n_boot,
                                    ci_level=ci_level, seed=seed)
            section[key]["scale"] = [1, 10]
        if res["name"] != baseline:
            if [s["prompt_index"] for s in samples] != [s["prompt_index"] for s in base]:
                raise ValueError("pairwise judging needs the same prompts and samples per prompt for every model")
            pw = judge.pairwise([judge_query(s["query"], s.get("images", 0)) for s in samples],
                                [s["response"] for s in samples],
                                [s["response"] for s in base])
            scores = pw["scores"]
            for s, v in zip(samples, scores):
                s[f"judge_win_vs_{baseline}"] = v
            first, second = pw["first"].values, pw["second"].values
            both = [(a, b) for a, b in zip(first, second) if a is not None and b is not None]
            consistent = sum((a, b) in (("A", "B"), ("B", "A"), ("tie", "tie")) for a, b in both)
            summary = _summary(scores, [s["prompt_index"] for s in samples], n_boot=n_boot, ci_level=ci_level,
                               seed=seed)
            section["pairwise"] = {
                "baseline": baseline, "win_rate": summary["mean"], "ci": summary["ci"], "n_pairs": summary["n"],
                "pairs_without_verdict": summary["malformed"],
                "malformed_verdicts": pw["first"].malformed + pw["second"].malformed,
                "position_consistency": consistent / len(both) if both else None,
            }
        res["judge"] = section
        bar.update(1)
    bar.close()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def format_table(report: dict) -> str:
    """One row per model, the headline metrics as columns ("-" where a metric does not apply)."""
    header = ["model"] + [h for _, h, _ in TABLE_COLUMNS]
    lines = []
    for m in report["models"]:
        cells = [m["name"] + (" +constitution" if m.get("constitution") else "")]
        for key, _, fmt in TABLE_COLUMNS:
            v = m["metrics"].get(key)
            cells.append("-" if v is None else fmt.format(v))
        lines.append(cells)
    widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]
    fmt_row = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt_row(header), "  ".join("-" * w for w in widths)] + [fmt_row(r) for r in lines])


def format_intervals(report: dict) -> str:
    """Each rate (and judge score) with its bootstrap interval, one line per model."""
    level = report.get("settings", {}).get("bootstrap", {}).get("ci_level", 0.95)
    lines = [f"{level:.0%} bootstrap intervals (prompts resampled):"]
    for m in report["models"]:
        parts = []
        for key in RATES:
            v, ci = m["metrics"].get(key), (m.get("metrics_ci") or {}).get(key)
            if v is not None:
                parts.append(f"{key} {v:.1%}" + (f" [{ci[0]:.1%}, {ci[1]:.1%}]" if ci else ""))
        j = m.get("judge") or {}
        for key in ("safety", "helpfulness"):
            d = j.get(key)
            if d and d["mean"] is not None:
                parts.append(f"judge_{key} {d['mean']:.2f}/10 [{d['ci'][0]:.2f}, {d['ci'][1]:.2f}] "
                             f"({d['malformed']} malformed)")
            elif d:
                parts.append(f"judge_{key} - ({d['malformed']} malformed)")
        pw = j.get("pairwise")
        if pw:
            if pw["win_rate"] is not None:
                parts.append(f"win_rate_vs_{pw['baseline']} {pw['win_rate']:.1%} [{pw['ci'][0]:.1%}, "
                             f"{pw['ci'][1]:.1%}] ({pw['malformed_verdicts']} malformed verdicts)")
            else:
                parts.append(f"win_rate_vs_{pw['baseline']} - ({pw['malformed_verdicts']} malformed verdicts)")
        lines.append(f"  {m['name']}: " + "; ".join(parts))
    return "\n".join(lines)


def write_plots(results: list[dict], output_dir: str) -> dict:
    """safety_vs_helpfulness.png, lengths.png, entropy.png; returns {plot: filename}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    fig, ax = plt.subplots(figsize=(6.5, 5.2))
    # Models often land on top of each other (a student next to its teacher), so the points are told
    # apart by colour and marker and named in a legend below the axes: no text is drawn on the plot, so
    # no two labels can overlap, however close the points are.
    markers = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
    for i, r in enumerate(results):
        x, y = r["metrics"]["benign_compliance"], r["metrics"]["harmful_refusal"]
        if x is None or y is None:
            continue
        ax.scatter([x], [y], s=70, marker=markers[i % len(markers)], color=f"C{i % 10}", alpha=0.85,
                   edgecolors="black", linewidths=0.5, label=f"{r['name']} ({x:.0%}, {y:.0%})", zorder=3)
    ax.set_xlabel("benign compliance (helpfulness)")
    ax.set_ylabel("harmful refusal rate (safety)")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title("safety vs helpfulness")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8, frameon=False,
                  title="model (benign compliance, harmful refusal)", title_fontsize=8)
    fig.tight_layout()
    files["safety_vs_helpfulness"] = "safety_vs_helpfulness.png"
    fig.savefig(os.path.join(output_dir, files["safety_vs_helpfulness"]), dpi=110, bbox_inches="tight")
    plt.close(fig)

    for key, fname, label in (("_lengths", "lengths.png", "response length (tokens)"),
                              ("_entropies", "entropy.png", "mean token entropy per response (nats)")):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        data = [r[key] or [0.0] for r in results]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(results) + 1))
        ax.set_xticklabels([r["name"] for r in results], rotation=20, fontsize=8)
        ax.set_ylabel(label)
        ax.set_title(f"{label.split(' (')[0]} - benign and general prompts")
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(os.path.join(output_dir, fname), dpi=110)
        plt.close(fig)
        files[fname.split(".")[0]] = fname
    return files

