"""The training loop both stages share.

A stage (``copsd.sft.CrossSFT``, ``copsd.distill.Distiller``) subclasses :class:`StageTrainer` and
writes only its algorithm: what one step computes (``train_step``), what its checkpoints record
(``checkpoint_state``, ``extra_tensors``, ``model_card``) and what a resume must check
(``check_resume``, ``restore_extra``).  Everything else lives here, once:

* the accelerator, model loading, LoRA / gradient checkpointing, optimizer and scheduler;
* micro-batching with gradient accumulation (``no_sync`` on all but the last micro-batch, so DDP
  all-reduces once per optimizer step), clipping, optimizer and scheduler step
  (:meth:`StageTrainer.optimizer_step`);
* the step loop: progress bar, metrics logging (``metrics.jsonl``, TensorBoard if installed),
  checkpoints every ``save_steps`` steps and at the end (atomic, rotated by ``save_total_limit``),
  exact resume, and the final Hugging Face model.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import uuid

import torch

from copsd import _hf, fsdp
from copsd.checkpoint import (
    RUN_FILE,
    load_model_weights,
    load_training_state,
    read_run,
    read_state,
    resolve_resume,
    run_outputs,
    save_checkpoint,
    write_run,
)
from copsd.config import TrainConfig
from copsd.constitution import require_chat_template

logger = logging.getLogger("copsd")


# --------------------------------------------------------------------------- building blocks

def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    # cpu=True where there is no GPU: it is what lets accelerate pick gloo (MULTI_CPU) under torchrun
    return Accelerator(mixed_precision="bf16" if cfg.bf16 else "no", cpu=not torch.cuda.is_available())


def check_model_path(key: str, path: str) -> None:
    """Fail at once, naming the config key, for a local model path that does not exist (no hub look-up for a
    path that is plainly local); hub ids are left to transformers."""
    from copsd.data import looks_local

    if not isinstance(path, str) or not path:
        raise ValueError(f"{key}: expected a model directory or hub id, got {path!r}")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{key}: {path} is a directory but holds no Hugging Face model "
                                    "(no config.json)")
        return
    if os.path.exists(path):
        raise ValueError(f"{key}: {path} is a file; expected a model directory or hub id")
    if looks_local(os.path.expanduser(path)):
        raise FileNotFoundError(f"{key}: no such model directory: {path}")


def _load_error(key: str, path: str, e: Exception) -> Exception:
    return OSError(f"{key}: could not load {path!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e})")


def load_tokenizer(path: str, trust_remote_code: bool, key: str = "model_name_or_path"):
    from transformers import AutoTokenizer

    check_model_path(key, path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise _load_error(key, path, e) from e
    if not getattr(tok, "chat_template", None):  # a VLM directory may keep it beside the processor
        from copsd.vlm import _chat_template_file

        tok.chat_template = _chat_template_file(path) or tok.chat_template
    require_chat_template(tok)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer of {path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, *, trust_remote_code: bool, dtype=torch.float32, device=None,
                   key: str = "model_name_or_path"):
    """The causal LM of ``path``; for a vision-language model (``copsd.vlm``), its image-text-to-text model."""
    from transformers import AutoModelForCausalLM

    from copsd import vlm

    check_model_path(key, path)
    try:
        if vlm.is_vlm_path(path, trust_remote_code):
            model = vlm.load_vlm(path, trust_remote_code=trust_remote_code, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise _load_error(key, path, e) from e
    return model.to(device) if device is not None else model


def load_vision(path: str, tokenizer, trust_remote_code: bool, key: str = "model_name_or_path"):
    """The ``copsd.vlm.VisionProcessor`` of a vision-language model directory (sharing ``tokenizer``), or None
    for a text model."""
    from copsd import vlm

    if not vlm.is_vlm_path(path, trust_remote_code):
        return None
    return vlm.load_vision_processor(path, tokenizer, trust_remote_code=trust_remote_code, key=key)


def prepare_trainable(model, cfg: TrainConfig):
    """Gradient checkpointing and LoRA (peft) as configured; returns the (maybe wrapped) model."""
    from copsd import vlm

    image_model = vlm.is_vlm(model)
    if image_model and cfg.freeze_vision_tower:
        vlm.freeze_vision_tower(model)
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.use_peft:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ValueError("use_peft=true needs the 'peft' package (pip install copsd[peft])") from None
        extra = {}
        if image_model and cfg.freeze_vision_tower:  # LoRA on the language model only
            import dataclasses

            if "exclude_modules" not in {f.name for f in dataclasses.fields(LoraConfig)}:
                raise ValueError("use_peft with a vision-language model and freeze_vision_tower=true needs peft >= "
                                 "0.14 (LoraConfig.exclude_modules)")
            extra["exclude_modules"] = vlm.LANGUAGE_ONLY_EXCLUDE
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.lora_target_modules or "all-linear", task_type="CAUSAL_LM", **extra)
        torch.manual_seed(cfg.seed)  # LoRA's initialisation is random: the same in every process and every run
        model = get_peft_model(model, lora)
        if os.path.isdir(cfg.model_name_or_path):  # adapters name their base by absolute path, not the cwd's
            for pc in model.peft_config.values():
                pc.base_model_name_or_path = os.path.abspath(cfg.model_name_or_path)
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    return model


def hf_model(model):
    """The transformers model inside a peft wrapper (LoRA layers still active), or the model itself."""
    return model.get_base_model() if is_peft(model) else model


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _fusable(p) -> bool:
    """A floating-point CPU / CUDA parameter, plain or FSDP2's DTensor (whose ops run on its local shard)."""
    if not p.is_floating_point() or p.device.type not in ("cpu", "cuda"):
        return False
    if type(p) in (torch.Tensor, torch.nn.Parameter):
        return True
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(p, DTensor)


def adamw_implementation(params) -> dict:
    """``torch.optim.AdamW``'s implementation flags for ``params``: the fused kernel (one multi-tensor kernel
    per device and dtype) when every parameter is a floating-point CPU / CUDA tensor, plain or FSDP2's DTensor
    (so a sharded run does the same arithmetic as a one-process run), else the ``foreach`` multi-tensor loop.
    torch's own default on CPU is the per-parameter Python loop, many times slower on a model with many small
    tensors."""
    fused = all(_fusable(p) for p in params)
    return {"fused": True, "foreach": None} if fused else {"fused": None, "foreach": True}


def make_optimizer(model, cfg: TrainConfig):
    """AdamW over the trainable parameters (two groups: with and without weight decay), with the
    implementation of `adamw_implementation`.  A loaded state dict keeps that implementation: the flags
    saved in a checkpoint (e.g. one written before the fused kernel was used) do not override it."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 or cfg.weight_decay_1d_params else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    impl = adamw_implementation(decay + no_decay)
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate,
                            betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, **impl)

    def keep_implementation(optimizer):
        for group in optimizer.param_groups:
            group.update(impl)
            if not impl["fused"]:
                continue
            for p in group["params"]:  # the fused kernel keeps ``step`` as fp32 on the parameter's device
                state = optimizer.state.get(p)
                if state and "step" in state:
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)

    opt.register_load_state_dict_post_hook(keep_implementation)
    return opt


def make_scheduler(optimizer, cfg: TrainConfig, total_optimizer_steps: int):
    from transformers import get_scheduler

    return get_scheduler(cfg.lr_scheduler_type, optimizer,
                         num_warmup_steps=math.ceil(cfg.warmup_ratio * total_optimizer_steps),
                         num_training_steps=total_optimizer_steps)


class PolicyHidden(torch.nn.Module):
    """``forward(ids, mask) -> (final hidden states, lm_head weight)``: what the fused loss ops consume.

    Wrapping this (not the LM) in DDP keeps the lm_head GEMM out of the model's forward, so full logits
    are never built, while every parameter still takes part in DDP's gradient reduction.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, vision=None, context_lens=None):
        """``vision``: one ``VisionInputs`` or None per row (a vision-language model's images, see
        ``copsd.vlm.hidden_states``), with ``context_lens`` the rows' prompt lengths."""
        model = hf_model(self.model)
        decoder, head = _hf.decoder_and_head(model)
        if vision is not None:
            from copsd.vlm import hidden_states

            return hidden_states(model, input_ids, attention_mask, vision, context_lens), fsdp.full_weight(head)
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state, fsdp.full_weight(head)


def wrap_policy(acc, model, cfg: TrainConfig, pad_token_id: int):
    """``PolicyHidden(model)`` prepared for the launch: FSDP2-sharded when asked (see ``copsd.fsdp``), else
    through accelerate (DDP over processes).  Build the optimizer after this: FSDP2 replaces the parameters."""
    if fsdp.requested():
        return fsdp.shard_policy(PolicyHidden(model), acc, bf16=cfg.bf16, pad_token_id=pad_token_id)
    return acc.prepare_model(PolicyHidden(model))


def pad_right(rows: list[list[int]], pad: int, device):
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), n), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long, device=device)
        mask[i, :len(r)] = 1
    return ids, mask


def gather_rows(hidden: torch.Tensor, starts: list[int], lengths: list[int]) -> torch.Tensor:
    """Packed ``[sum(lengths), H]``: rows ``starts[i] .. starts[i]+lengths[i]`` of each sequence i."""
    idx_b, idx_t = [], []
    for i, (s, n) in enumerate(zip(starts, lengths)):
        idx_b += [i] * n
        idx_t += list(range(s, s + n))
    dev = hidden.device
    return hidden[torch.tensor(idx_b, device=dev, dtype=torch.long), torch.tensor(idx_t, device=dev, dtype=torch.long)]


def micro_batches(items: list, size: int) -> list[list]:
    """``items`` cut into consecutive micro-batches of ``size``."""
    return [items[a:a + size] for a in range(0, len(items), size)]


def step_seed(seed: int, step: int, index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{step}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The data order of one epoch: a permutation fixed by (seed, epoch), so any position can be recomputed."""
    g = torch.Generator().manual_seed(step_seed(seed, -1, epoch))
    return tuple(torch.randperm(n, generator=g).tolist())


def strided_share(step: int, per_device: int, n: int, seed: int, rank: int, world: int) -> list[int]:
    """This process's data indices for ``step``: global positions ``step * per_device * world + rank + k * world``
    of the epoch orders, so the global batch does not depend on how it is split over processes."""
    out = []
    for k in range(per_device):
        g = step * per_device * world + rank + k * world
        out.append(epoch_order(n, seed, g // n)[g % n])
    return out


class Sums:
    """Named (sum, count) pairs, reduced over processes in one all-reduce."""

    def __init__(self, device):
        self.device = device
        self.data: dict[str, list[float]] = {}

    def add(self, name, total, count):
        s = self.data.setdefault(name, [0.0, 0.0])
        s[0] += total
        s[1] += count

    def reduce(self, acc) -> dict:
        names = sorted(self.data)
        t = torch.tensor([self.data[n] for n in names], dtype=torch.float64, device=self.device).reshape(-1, 2)
        if acc.num_processes > 1:
            t = acc.reduce(t, "sum")
        return {n: (float(s / c) if c > 0 else float("nan")) for n, (s, c) in zip(names, t.tolist())}


# --------------------------------------------------------------------------- checks before step 1

def load_stage_constitution(cfg: TrainConfig):
    from copsd.constitution import load_constitution

    return load_constitution(cfg.constitution, category_mode=cfg.category_mode, include_title=cfg.constitution_title)


def dataset_name(source) -> str:
    return source if isinstance(source, str) else f"<{type(source).__name__}>"


def config_dict(cfg) -> dict:
    """The config as plain data (a dataset object passed in the Python API is named, not copied)."""
    import dataclasses

    from copsd.config import to_dict

    if all(isinstance(getattr(cfg, k, ""), (str, type(None))) for k in ("dataset", "sft_dataset")):
        return to_dict(cfg)
    shallow = dataclasses.replace(cfg)
    for k in ("dataset", "sft_dataset"):
        if hasattr(shallow, k) and not isinstance(getattr(shallow, k), (str, type(None))):
            object.__setattr__(shallow, k, dataset_name(getattr(shallow, k)))
    return to_dict(shallow)


def template_errors():
    try:
        from jinja2 import TemplateError
    except ImportError:  # pragma: no cover - jinja2 comes with transformers' chat templates
        return (ValueError, TypeError, KeyError)
    return (ValueError, TypeError, KeyError, TemplateError)


def problem_message(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    if type(e).__module__.startswith("jinja2"):
        return f"the chat template fails on this row ({type(e).__name__}: {text})"
    return text


def preflight_prompts(rows, tokenizer, constitution, cfg, *, completion_tokens: int,
                      contexts: dict[str, int | None], source=None, problems: list[str] | None = None,
                      vision=None):
    """Render every prompt row in the student and teacher views and check its length, before step 1.

    ``contexts`` maps a model name ("student", "teacher") to its context length (None: unbounded); a view
    plus ``completion_tokens`` (the config's ``max_completion_length``) must fit.  Prompts longer than
    ``cfg.max_prompt_length`` (student view) are cut from the left or skipped (``cfg.prompt_truncation``) and
    counted.  Returns ``(rows, views)`` with ``views[i] = (student ids, teacher ids)``; raises one ValueError
    listing every problem with its file and line (after any ``problems`` found while parsing the rows).
    ``vision``: the model's ``copsd.vlm.VisionProcessor`` (None for a text model, where a row with images is a
    problem); each row's images are processed and their tokens counted into its views.
    """
    from copsd.constitution import render_views

    errors = template_errors()
    problems, kept, views = list(problems or []), [], []
    cut = skipped = 0
    limit = cfg.max_prompt_length
    for row in rows:
        try:
            problem = constitution.check_category(row.category) if not row.constitution else None
            if problem:
                raise ValueError(problem)
            text = constitution.text_for(row.category, row.constitution)
            counts = image_token_counts(row, vision)
            s_ids, t_ids = render_views(tokenizer, row.messages, text, cfg.teacher_template, image_tokens=counts)
            if limit is not None and len(s_ids) > limit:
                if cfg.prompt_truncation == "skip":
                    skipped += 1
                    continue
                if counts is not None:
                    raise ValueError(f"the student-view prompt ({len(s_ids)} tokens, images included) is longer "
                                     f"than max_prompt_length={limit}; a row with images is never cut (raise "
                                     "max_prompt_length, lower the image processor's max_pixels or use "
                                     "prompt_truncation: skip)")
                row, s_ids, t_ids = _left_truncate(row, tokenizer, text, cfg.teacher_template, limit, len(s_ids))
                cut += 1
        except errors as e:
            problems.append(f"{row.where}: {problem_message(e)}")
            continue
        too_long = False
        for view, ids in (("student", s_ids), ("teacher", t_ids)):
            ctx = contexts.get(view)
            if ctx is not None and len(ids) + completion_tokens > ctx:
                too_long = True
                problems.append(
                    f"{row.where}: the {view}-view prompt ({len(ids)} tokens) + max_completion_length "
                    f"({completion_tokens}) = {len(ids) + completion_tokens} exceed the {view} model's context of "
                    f"{ctx} tokens (max_position_embeddings); shorten the prompt, lower max_completion_length or "
                    "set max_prompt_length")
                break  # one problem per row
        if not too_long:
            kept.append(row)
            views.append((s_ids, t_ids))
    what = f"dataset {dataset_name(source if source is not None else cfg.dataset)} (checked before step 1)"
    if problems:
        from copsd.data import report_problems

        raise report_problems(what, sorted(problems, key=_location_key))
    if cut or skipped:
        logger.warning("max_prompt_length=%d: %d prompt(s) cut from the left, %d skipped (prompt_truncation=%s)",
                       limit, cut, skipped, cfg.prompt_truncation)
    if not kept:
        raise ValueError(f"{what}: no prompt left (all longer than max_prompt_length={limit})")
    return kept, views


def image_token_counts(row, vision) -> list[int] | None:
    """The image-token count of each of ``row``'s images (None for a text row); a ValueError for a row with
    images when the model is not a vision-language model (``vision`` None)."""
    if not getattr(row, "images", None):
        return None
    if vision is None:
        raise ValueError(f"the row has {len(row.images)} image(s) but the model is not a vision-language model "
                         "(its config has no vision_config / image_token_id)")
    return vision.count_tokens(row.images, row.where)


def check_sharded_images(rows, vision, what: str) -> None:
    """Under FSDP2 every process must run the same sharded modules, the vision tower included: a data set of a
    vision-language model must then be all image rows or all text rows (a step where one process has an image
    and another none would desynchronise the processes' collectives)."""
    if vision is None or not fsdp.requested():
        return
    with_images = [r for r in rows if getattr(r, "images", None)]
    if with_images and len(with_images) != len(rows):
        text_row = next(r for r in rows if not getattr(r, "images", None))
        raise ValueError(f"{what}: FSDP2 with a vision-language model needs image rows only or text rows only "
                         f"({len(with_images)} of {len(rows)} have images; {text_row.where} has none): every "
                         "process must run the sharded vision tower in the same steps. Use DDP (no FSDP config) "
                         "or split the data set")


def _location_key(problem: str):
    """Sort ``"<file> line <n>: ..."`` / ``"<file> row <n>: ..."`` messages by file, then number."""
    import re

    m = re.match(r"^(.*?) (?:line|row) (\d+): ", problem)
    return (m.group(1), int(m.group(2))) if m else (problem, 0)


def _left_truncate(row, tokenizer, constitution_text, template, limit, length):
    """Cut the start of the last user message until the student view fits ``limit`` tokens."""
    import dataclasses

    from copsd.constitution import render_views

    idx = max(i for i, m in enumerate(row.messages) if m["role"] == "user")
    content_ids = tokenizer(row.messages[idx]["content"], add_special_tokens=False)["input_ids"]
    drop = length - limit
    for _ in range(8):
        if drop >= len(content_ids):
            break
        messages = [dict(m) for m in row.messages]
        messages[idx]["content"] = tokenizer.decode(content_ids[drop:], skip_special_tokens=True)
        s_ids, t_ids = render_views(tokenizer, messages, constitution_text, template)
        if len(s_ids) <= limit:
            return dataclasses.replace(row, messages=messages), s_ids, t_ids
        drop += len(s_ids) - limit
    raise ValueError(f"the prompt cannot be cut to max_prompt_length={limit} tokens by shortening its last user "
                     "message (the rest of the conversation and the template are longer); use "
                     "prompt_truncation: skip or raise max_prompt_length")


# --------------------------------------------------------------------------- logging

class MetricsLogger:
    """Main process only: ``metrics.jsonl`` (always; truncated to the resumed step), TensorBoard when asked for
    and installed (a warning when asked for and missing), samples."""

    def __init__(self, output_dir: str, report_to: list[str], start_step: int, enabled: bool):
        self.enabled = enabled
        self.tb = None
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.samples_path = os.path.join(output_dir, "samples.jsonl")
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        for path in (self.path, self.samples_path):
            _truncate_jsonl(path, start_step)
        if "tensorboard" in report_to and "none" not in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(output_dir, "runs"), purge_step=start_step + 1)
            except ImportError:
                logger.warning("report_to includes 'tensorboard' but tensorboard is not installed "
                               "(pip install tensorboard); metrics go to %s only", self.path)

    def log(self, step: int, metrics: dict):
        if not self.enabled:
            return
        # metrics.jsonl is written whatever report_to says: the one record that needs no optional package
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **{k: _finite_or_none(v) for k, v in metrics.items()}}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def samples(self, step: int, rows: list[dict]):
        if not self.enabled:
            return
        with open(self.samples_path, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **r}, ensure_ascii=False) + "\n")
        table = ["| prompt | completion | reward | refusal |", "|---|---|---|---|"]
        for r in rows:
            cells = [str(r.get(k, "")).replace("|", "\\|").replace("\n", " ")[:300]
                     for k in ("prompt", "completion", "reward", "refusal")]
            table.append("| " + " | ".join(cells) + " |")
        if self.tb is not None:
            self.tb.add_text("samples", "\n".join(table), step)

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _finite_or_none(v):
    """JSON has no NaN: a metric with no data this step (e.g. no benign prompt drawn) is written as null."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _truncate_jsonl(path: str, keep_upto: int):
    """Drop lines logged after ``keep_upto`` (a resumed run re-logs those steps)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= keep_upto]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- final model

def save_final(output_dir: str, model, tokenizer, constitution, card: str, state_dict: dict | None = None,
               vision=None):
    """HF model loadable by transformers (LoRA merged; the adapter kept in ``adapter/``); ``state_dict``: the
    gathered weights of an FSDP-sharded model; ``vision``: a VLM's ``VisionProcessor`` (its image processor is
    saved too)."""
    os.makedirs(output_dir, exist_ok=True)
    if is_peft(model):
        model.save_pretrained(os.path.join(output_dir, "adapter"))
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(output_dir)
    else:
        model.save_pretrained(output_dir, state_dict=state_dict)
    tokenizer.save_pretrained(output_dir)
    if vision is not None:
        vision.save_pretrained(output_dir)
    with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)
    if constitution.path:
        shutil.copyfile(constitution.path, os.path.join(output_dir, "constitution" +
                                                        os.path.splitext(constitution.path)[1]))
    with open(os.path.join(output_dir, "constitution.json"), "w", encoding="utf-8") as f:
        json.dump(constitution.to_dict(), f, indent=2, ensure_ascii=False)


# --------------------------------------------------------------------------- the loop

def check_output_dir(cfg: TrainConfig) -> None:
    """FileExistsError if a fresh run (no resume, no ``overwrite_output_dir``) would start over another run's
    outputs in ``cfg.output_dir``.  Cheap: the stages call it before loading anything, ``copsd run`` for both."""
    if cfg.overwrite_output_dir:
        return
    if cfg.resume_from_checkpoint and (read_run(cfg.output_dir) or resolve_resume(cfg.resume_from_checkpoint,
                                                                                   cfg.output_dir)):
        return
    found = run_outputs(cfg.output_dir)
    if found:
        shown = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
        raise FileExistsError(
            f"output_dir {cfg.output_dir} already holds a run ({shown}); pass --overwrite_output_dir true "
            "to start a new run there (checkpoints of the old run are kept and never rotated or resumed), "
            "--resume_from_checkpoint true to continue it, or choose another output_dir")


def _vlm_model(model) -> bool:
    from copsd import vlm

    return vlm.is_vlm(model)


def _load_vlm_weights(model, ckpt: str) -> None:
    """Exact weights of a VLM checkpoint.  ``save_pretrained`` writes a VLM's tensors under its family's
    checkpoint names (``visual.*``, ``model.layers.*``), not the module names (``model.visual.*``,
    ``model.language_model.*``); ``from_pretrained`` maps them back, so the checkpoint is read through it and
    its tensors copied (every one: a missing or extra name is an error)."""
    from copsd import vlm

    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    loaded = vlm.load_vlm(ckpt, dtype=dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)


class StageTrainer:
    """The step loop of one stage.

    A subclass sets, before :meth:`train` reaches the loop (in ``__init__`` or :meth:`prepare`):
    ``cfg``, ``acc``, ``device``, ``tokenizer``, ``constitution``, ``model`` (the trainable model, maybe a
    peft wrapper), ``policy`` (``acc.prepare_model(PolicyHidden(model))``), ``optimizer``, ``scheduler``
    and ``max_steps``; and implements :meth:`train_step` and :meth:`checkpoint_state`.
    """

    stage = "train"          # name in trainer_state.json and the progress bar
    card_title = "copsd model"
    card_stage = ""
    step = 0
    run_id = ""
    logger: MetricsLogger | None = None
    vision = None            # copsd.vlm.VisionProcessor of a vision-language model

    # ------------------------------------------------------------------ stage hooks

    def prepare(self):
        """Everything that must happen before a resume and step 1 (checks, data, models)."""

    def train_step(self, step: int) -> dict:
        """One step (0-based); returns its metrics (already reduced over processes)."""
        raise NotImplementedError

    def checkpoint_state(self) -> dict:
        """What ``trainer_state.json`` records beyond the stage name (must include ``global_step``)."""
        raise NotImplementedError

    def extra_tensors(self) -> dict | None:
        """Named tensor dicts saved beside the model in each checkpoint (e.g. an EMA teacher)."""
        return None

    def check_resume(self, ckpt: str, state: dict):
        """Raise if ``ckpt`` cannot continue this run (other data, constitution, batch size)."""

    def restore_extra(self, ckpt: str, state: dict):
        """Restore what :meth:`extra_tensors` saved and any stage state."""

    def end_of_step(self, metrics: dict) -> bool:
        """After step ``self.step`` (1-based, metrics not yet logged); return True to stop now."""
        return False

    def progress_postfix(self, metrics: dict) -> dict:
        return {"loss": f"{metrics.get('loss', float('nan')):.4f}"}

    def card_extra(self) -> dict:
        """Further ``- key: value`` lines for the model card (e.g. the teacher's provenance)."""
        return {}

    def model_card(self) -> str:
        from copsd.checkpoint import model_card

        return model_card(title=self.card_title, base_model=self.cfg.model_name_or_path,
                          constitution=self.constitution, stage=self.card_stage, step=self.step,
                          config=config_dict(self.cfg), extra=self.card_extra())

    # ------------------------------------------------------------------ shared pieces

    def global_token_count(self, local_tokens: int) -> float:
        """Tokens summed over processes (at least 1): the normalizer that makes the loss a token-mean."""
        t = torch.tensor(float(local_tokens), device=self.device)
        return max(float(self.acc.reduce(t, "sum")), 1.0)

    def optimizer_step(self, micro_losses) -> float:
        """Backward each micro-batch's loss (``micro_losses``: callables returning a scalar tensor whose sum over
        micro-batches and processes is the step's loss), gradients all-reduced only after the last; then clip,
        optimizer and scheduler step.  Returns the gradient norm before clipping (NaN when not clipping)."""
        acc, cfg = self.acc, self.cfg
        micro_losses = list(micro_losses)
        for a, loss_fn in enumerate(micro_losses):
            last = a == len(micro_losses) - 1
            with contextlib.nullcontext() if last else acc.no_sync(self.policy):
                loss = loss_fn()
                acc.backward(loss * acc.num_processes)  # DDP averages gradients over processes
        grad_norm = float("nan")
        if cfg.max_grad_norm > 0:
            norm = acc.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], cfg.max_grad_norm)
            grad_norm = float(fsdp.full_tensor(norm))  # a DTensor when the model is FSDP2-sharded
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def unwrapped_model(self):
        return self.acc.unwrap_model(self.policy).model

    def save(self):
        """Checkpoint ``checkpoint-<step>`` (every process calls this)."""
        state = {"stage": self.stage, "config": config_dict(self.cfg), "run_id": self.run_id,
                 **self.checkpoint_state()}
        sharded = self.sharded()
        save_checkpoint(self.cfg.output_dir, self.step, model=self.unwrapped_model(), tokenizer=self.tokenizer,
                        optimizer=self.optimizer, scheduler=self.scheduler, state=state,
                        extra_tensors=self.extra_tensors(), model_card=self.model_card(),
                        is_main=self.acc.is_main_process, rank=self.acc.process_index,
                        barrier=self.acc.wait_for_everyone, save_total_limit=self.cfg.save_total_limit,
                        model_state_dict=fsdp.full_state_dict(self.model) if sharded else None,
                        optimizer_shard=(fsdp.local_optimizer_state(self.optimizer), self.acc.num_processes)
                        if sharded else None)
        self._write_run(finished=False)  # the run record follows its checkpoints (a killed run shows its step)

    def sharded(self) -> bool:
        return fsdp.is_sharded(self.model)

    def whole_copy(self, state_dict: dict):
        """A whole (unsharded, CPU) copy of the trainable model holding ``state_dict``, e.g. to merge LoRA."""
        cfg = self.cfg
        model = prepare_trainable(load_causal_lm(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code),
                                  cfg)
        model.load_state_dict(state_dict)
        return model

    def resume(self, ckpt: str):
        sharded = self.sharded()
        state = load_training_state(ckpt, None if sharded else self.optimizer, self.scheduler,
                                    rank=self.acc.process_index)
        self.check_resume(ckpt, state)
        if sharded:
            fsdp.load_optimizer_shard(self.optimizer, ckpt, self.acc.process_index, self.acc.num_processes)
        if not is_peft(self.model) and not sharded and _vlm_model(self.model):
            _load_vlm_weights(self.model, ckpt)
        else:
            load_model_weights(self.model, ckpt)
        self.restore_extra(ckpt, state)
        self.step = int(state["global_step"])

    # ------------------------------------------------------------------ loop

    def _claim_output_dir(self) -> str | None:
        """Refuse to start a fresh run over another run's outputs; returns the checkpoint to resume from.

        Sets ``self.run_id`` (a new id, or the resumed checkpoint's) and ``self._finished`` (resuming a run that
        already completed: nothing to do)."""
        cfg = self.cfg
        record = read_run(cfg.output_dir)
        ckpt = resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
        self._finished = False
        if ckpt:
            self.run_id = read_state(ckpt).get("run_id") or (record or {}).get("run_id") or uuid.uuid4().hex
            return ckpt
        if cfg.resume_from_checkpoint and record:
            if record.get("finished"):
                self._finished = True
                return None
            logger.warning("resume_from_checkpoint: %s holds no checkpoint of its run yet; starting at step 0",
                           cfg.output_dir)
        else:
            check_output_dir(cfg)
        self.run_id = uuid.uuid4().hex
        return None

    def _write_run(self, finished: bool):
        if self.acc.is_main_process:
            write_run(self.cfg.output_dir, {"run_id": self.run_id, "stage": self.stage, "finished": finished,
                                            "global_step": self.step, "max_steps": self.max_steps})

    def _clean_failed_start(self, created: bool):
        """After an error before step 1 in an output_dir this run created: leave no empty directory."""
        out = self.cfg.output_dir
        if not (created and self.acc.is_main_process and os.path.isdir(out)):
            return
        for name in (RUN_FILE, "metrics.jsonl", "samples.jsonl"):
            path = os.path.join(out, name)
            if os.path.isfile(path) and (name == RUN_FILE or os.path.getsize(path) == 0):
                os.remove(path)
        runs = os.path.join(out, "runs")
        if os.path.isdir(runs) and not any(files for _, _, files in os.walk(runs)):
            shutil.rmtree(runs, ignore_errors=True)
        if not os.listdir(out):
            os.rmdir(out)

    def train(self) -> dict:
        """Prepare, resume if asked, run the steps, checkpoint, save the final model; returns the last metrics."""
        cfg, acc = self.cfg, self.acc
        created = not os.path.exists(cfg.output_dir)
        ckpt = self._claim_output_dir()
        acc.wait_for_everyone()  # every process has read output_dir before anything is written to it
        if self._finished:
            logger.info("%s: the run there has already finished; nothing to resume", cfg.output_dir)
            return {}
        start = self.step
        try:
            self.prepare()
            if ckpt:
                self.resume(ckpt)
                logger.info("resumed from %s at step %d", ckpt, self.step)
                start = self.step
            self._write_run(finished=False)
            return self._loop()
        except BaseException:
            if self.step == start:
                self._clean_failed_start(created)
            raise

    def _loop(self) -> dict:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.acc
        self.logger = MetricsLogger(cfg.output_dir, cfg.report_to, self.step, acc.is_main_process)
        bar = tqdm(total=self.max_steps, initial=self.step, desc=f"copsd {self.stage}",
                   disable=cfg.disable_tqdm or not acc.is_main_process, dynamic_ncols=True)
        last: dict = {}
        try:
            while self.step < self.max_steps:
                m = self.train_step(self.step)
                self.step += 1
                stop = self.end_of_step(m)
                last = m
                if self.step % cfg.logging_steps == 0 or self.step == self.max_steps:
                    self.logger.log(self.step, m)
                bar.update(1)
                bar.set_postfix(**self.progress_postfix(m))
                saved = bool(cfg.save_steps) and self.step % cfg.save_steps == 0 and self.step < self.max_steps
                if saved:
                    self.save()
                if stop:
                    if not saved:
                        self.save()
                    break
        finally:
            bar.close()
            self.logger.close()
        if self.step >= self.max_steps:
            if cfg.save_steps:
                self.save()
            full = fsdp.full_state_dict(self.model) if self.sharded() else None
            if acc.is_main_process:
                model = self.unwrapped_model()
                if full is not None and is_peft(model):  # LoRA is merged on a whole copy
                    model, full = self.whole_copy(full), None
                save_final(cfg.output_dir, model, self.tokenizer, self.constitution, self.model_card(),
                           state_dict=full, vision=self.vision)
                self._write_run(finished=True)
            acc.wait_for_everyone()
        return last
