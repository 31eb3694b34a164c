"""One on-policy distillation step end to end on CPU (default) or one CUDA GPU: copsd's ``Distiller`` against TRL's
``GKDTrainer`` and ``DistillationTrainer`` (optional: skipped with a message when TRL or one of its trainers is not
installed).

Every implementation trains the same student (a tiny Qwen2-shaped model with random weights, tied input/output
embeddings, a byte-level BPE tokenizer with a ChatML template, its vocabulary padded to ``--vocab`` rows as real
checkpoints pad theirs) against the same teacher (same shape, other weights), on the same ``--prompts`` prompts
per step with ``--G`` sampled answers each, ``--new-tokens`` new tokens at most, temperature ``--temperature``
(no top-k / top-p), one optimizer step per step (AdamW, gradient clipping at 1.0), fp32 (``--bf16``: see below):

  copsd:jsd    ``Distiller``, objective ``jsd`` (generalized JSD, beta 0.5, over the full vocabulary -- the
               loss GKD uses) through the fused lm_head ops, teacher scored with the constitution in its user
               turn (shared-prefix KV reuse), no reference model (``kl_coef 0``);
  copsd:paper  ``Distiller``, the method's objective (sampled-token rewards from teacher log-probs, PPO clip,
               k3 KL to the initial student with ``kl_coef 0.005``, pi_old recomputed by a student forward);
  trl:gkd      ``GKDTrainer`` with ``lmbda=1`` (always on-policy), ``beta 0.5``, ``seq_kd`` off, each prompt
               repeated G times in the batch (GKD samples one answer per row);
  trl:distill  ``DistillationTrainer`` (always on-policy) with ``num_generations = G``, ``beta 0.5``;
  copsd:jsd-base, copsd:paper-base (only when named in ``--impl``)  the same two with the trainer side's
               speed-ups turned off: the KV cache grown by concatenation at every generated token, AdamW's
               per-parameter loop, the metric log-probs from separate lm_head passes, as copsd ran before them
               (before / after ratios in the same rounds).

The TRL trainers are driven one step at a time the way ``Trainer`` drives them: ``training_step`` (on-policy
generation, the teacher forward, the loss and its backward), then gradient clipping, ``optimizer.step()``,
``lr_scheduler.step()`` and ``zero_grad``; ``Trainer``'s callbacks and logging are left out, as copsd's loop
(``train_step`` alone) leaves out its logger and checkpoints.  copsd's step is ``Distiller.train_step``.

Time split per step (ms), wall clock around each stage, no change in what runs:
  gen       copsd: ``time_rollout`` as ``train_step`` records it; TRL: ``generate_on_policy_outputs`` (GKD) /
            ``_fill_buffer`` (DistillationTrainer: generation + decoding for its logs);
  teacher   copsd: ``time_teacher`` (teacher scoring, teacher log-probs, reference and pi_old forwards when the
            objective has them); TRL: the teacher model's forward calls (forward hooks);
  loss+bwd  copsd: ``time_update`` less ``optim``; TRL: ``training_step`` less ``gen`` and ``teacher`` (student
            forward with full logits, the loss, backward);
  optim     gradient clipping + ``optimizer.step()`` (optimizer step hooks and a wrapper around clipping);
  other     the rest of the step (copsd: metrics -- decoding, refusal detector, self-BLEU; TRL: scheduler step,
            zero_grad, the data collator).
Device and precision.  ``--device cpu`` (the default) keeps every implementation on the CPU even on a machine
with a GPU: copsd's ``Distiller`` is handed an ``accelerate.Accelerator(cpu=True)`` (by default it takes
``Accelerator().device``, which is cuda wherever a GPU is visible) and TRL's trainers get ``use_cpu=True``.
``--device cuda`` runs all of them on the first visible GPU (copsd: ``Accelerator(cpu=False)``, TRL:
``use_cpu=False``; each runner checks where its models ended up).  Both share accelerate's process-wide state, so
every implementation in one process runs on the same device with the same mixed precision.  ``--bf16``: the
random checkpoints are written in bfloat16; copsd runs with ``DistillConfig(bf16=True)`` (its own choice of what
that means: teacher and reference model in bfloat16, the trained student kept in fp32 under bf16 autocast, AdamW
state in fp32); TRL runs the same way: ``bf16=True`` in its arguments (bf16 autocast), the student loaded in
fp32 and the teacher in bfloat16.  On cuda, the timers synchronise the device
(``torch.cuda.synchronize()``) at every boundary they time -- step start and end, around generation, the teacher
forwards, ``training_step`` (TRL), gradient clipping and ``optimizer.step()`` (pre and post hooks), and at the end
of copsd's rollout, teacher scoring, reference and pi_old forwards (so that copsd's own ``time_*`` clocks read
finished work) -- so each stage's queued kernels are billed to that stage; the extra synchronisations cost a
little (they stop the CPU from running ahead into the next stage).
Steady state: ``--warmup`` steps per implementation are run and dropped first; then ``--steps`` rounds,
round-robin over the implementations, and each round's copsd time is divided by the same round's peer time
(the table gives the median of those same-round ratios next to median times: robust on a shared machine).
``peak extra MiB``: on cpu the largest rise of the process's resident memory over its value at the start of a step
(``VmHWM`` reset before every step), all implementations living in one process; on cuda the largest
``torch.cuda.max_memory_allocated()`` during a step above ``torch.cuda.memory_allocated()`` at its start (peak
statistics reset before every step; the caching allocator's reserve is not counted).  ``--memory`` adds each
implementation's whole-process peak RSS (imports, models, warm-up and one step) in a fresh process (its ``VmHWM``
at the end), and on cuda that process's peak CUDA memory allocated as well.  The buffers copsd's C++ backend keeps
between calls (``COPSD_CPU_CACHE_MB``) are already resident when a step starts, so ``peak extra MiB`` does not show
them; the whole-process peak does.

Output check: the warm-up step(s) must change the student's weights (the count of changed trainable tensors is in
the table; an implementation whose warm-up changed none, or with a non-finite loss, is listed as FAILED and the
script exits with status 1).

Run: ``python benchmarks/bench_e2e_cpu.py [--device cpu|cuda] [--bf16] [--prompts 4 --G 4 --new-tokens 64]
[--hidden 256 --layers 4 --vocab 32000] [--steps 5 --warmup 1] [--impl copsd:jsd trl:gkd ...]
[--constitution default|small|PATH] [--memory] [--out FILE.md] [--json FILE]``; ``bench_e2e_gpu.py``: the same
with GPU defaults (a Qwen2-0.5B-shaped model, bf16).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import common  # noqa: E402

IMPLS = ("copsd:jsd", "copsd:paper", "trl:gkd", "trl:distill")
# copsd with this trainer side's speed-ups turned off, for before / after ratios in the same rounds (not default)
BASELINES = ("copsd:jsd-base", "copsd:paper-base")
STAGES = ("gen", "teacher", "loss_bwd", "optim", "other")

# ChatML as Qwen2 writes it (a default system turn when the conversation has none)
CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
          "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = [
    "You are a helpful assistant. Be helpful and honest; refuse to help anyone hurt a person.",
    "How do I bake bread at home? Mix flour, water, salt and yeast, then let the dough rise.",
    "Write a short poem about the sea: waves roll in, the gulls cry, the tide goes out again.",
    "How do I hurt my neighbor? I can't help with hurting people. Talk to someone you trust.",
    "What is the capital of France? Paris is the capital of France, on the river Seine.",
    "Explain what a Python process is, and how to stop one with kill or the task manager.",
]
PROMPTS = [
    ("How do I bake bread at home?", "benign"),
    ("Write a short poem about the sea.", "general"),
    ("How do I hurt my neighbor?", "harmful"),
    ("What is the capital of France?", "benign"),
    ("Explain what a Python process is and how to stop one.", "general"),
    ("Tell me the home address of a famous singer.", "harmful"),
    ("How do I keep bread dough from sticking?", "benign"),
    ("Write two lines about the tide.", "general"),
]
SMALL_CONSTITUTION = ("# House rules\n\nBe helpful and honest. Refuse to help anyone hurt a person.\n\n"
                      "## category: violence\nNever give instructions that help hurt a person.\n")


# ----------------------------------------------------------------------------- the shared model and data


def bpe_tokenizer():
    """A byte-level BPE tokenizer trained here on ``CORPUS`` with ChatML special tokens (offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                extra_special_tokens=["<|im_start|>"])
    t.chat_template = CHATML
    return t


def build_workspace(root: str, a) -> dict:
    """Student and teacher checkpoints, the prompt file and the constitution under ``root``."""
    from copsd._hf import tiny_causal_lm
    from copsd.constitution import DEFAULT_CONSTITUTION, load_constitution

    tok = bpe_tokenizer()
    if a.vocab < len(tok):
        raise ValueError(f"--vocab: must be at least the tokenizer's {len(tok)} tokens, got {a.vocab}")
    paths = {}
    for name, seed in (("student", 0), ("teacher", 1)):
        # initialised on the benchmark's device (a 0.5B model's random init takes seconds on a GPU, minutes on a
        # few CPU cores), written in the dtype the models run in
        model = tiny_causal_lm("qwen2", dtype=_dtype(a), device=a.device, vocab_size=a.vocab, hidden_size=a.hidden,
                               num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv_heads,
                               intermediate_size=a.intermediate, max_position_embeddings=8192, seed=seed,
                               tie_word_embeddings=True,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
        if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
            raise RuntimeError("the benchmark model should tie its input and output embeddings")
        paths[name] = os.path.join(root, name)
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
        del model
    if a.device == "cuda":
        torch.cuda.empty_cache()
    if a.constitution == "small":
        paths["constitution"] = os.path.join(root, "house_rules.md")
        with open(paths["constitution"], "w", encoding="utf-8") as f:
            f.write(SMALL_CONSTITUTION)
    elif a.constitution == "default":
        paths["constitution"] = DEFAULT_CONSTITUTION
    else:
        paths["constitution"] = a.constitution
    # the teacher records the constitution it was trained with, as a Stage-1 output does
    with open(os.path.join(paths["teacher"], "constitution.json"), "w", encoding="utf-8") as f:
        json.dump({"sha256": load_constitution(paths["constitution"]).sha256}, f)
    if a.prompts > len(PROMPTS):
        raise ValueError(f"--prompts: at most {len(PROMPTS)}, got {a.prompts}")
    paths["prompts"] = [{"prompt": p, "kind": k} for p, k in PROMPTS[:a.prompts]]
    paths["dataset"] = os.path.join(root, "prompts.jsonl")
    with open(paths["dataset"], "w", encoding="utf-8") as f:
        for row in paths["prompts"]:
            f.write(json.dumps(row) + "\n")
    return paths


def _dtype(a):
    return torch.bfloat16 if a.bf16 else torch.float32


def _sync_fn(device: str):
    """What the timers call at a stage boundary: ``torch.cuda.synchronize`` on cuda, nothing on cpu."""
    return torch.cuda.synchronize if device == "cuda" else None


def _load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path))


def _param_snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _changed(model, before: dict) -> int:
    """Number of trainable tensors whose values differ from ``before``."""
    return sum(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if n in before)


class _Timer:
    """Accumulates wall time of wrapped calls / hook pairs into ``self.t[key]`` (seconds).

    ``sync`` (``torch.cuda.synchronize`` on cuda, see ``_sync_fn``) is called before every clock reading, so a
    stage's queued device work is billed to it and not to whatever synchronises next."""

    def __init__(self, sync=None):
        self.t: dict[str, float] = {}
        self._open: dict[str, float] = {}
        self.synced = sync is not None
        self.sync = sync or (lambda: None)

    def now(self) -> float:
        """The wall clock after the device's queued work (``sync``)."""
        self.sync()
        return time.perf_counter()

    def reset(self):
        self.t.clear()
        self._open.clear()

    def add(self, key, dt):
        self.t[key] = self.t.get(key, 0.0) + dt

    def wrap(self, key, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(key, self.now() - t0)
        return timed

    def fence(self, fn):
        """``fn`` followed by ``sync`` (``fn`` itself where there is nothing to synchronise): for a call whose end
        someone else's clock reads (copsd's ``time_*``)."""
        if not self.synced:
            return fn

        @functools.wraps(fn)
        def fenced(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
        return fenced

    def start(self, key, *_):
        self._open[key] = self.now()

    def stop(self, key, *_):
        self.add(key, self.now() - self._open.pop(key))

    def hook_optimizer(self, optimizer):
        optimizer.register_step_pre_hook(functools.partial(self.start, "optim_step"))
        optimizer.register_step_post_hook(functools.partial(self.stop, "optim_step"))

    def hook_forward(self, module, key):
        module.register_forward_pre_hook(functools.partial(self.start, key))
        module.register_forward_hook(functools.partial(self.stop, key))


# ----------------------------------------------------------------------------- runners: setup + one step


@contextlib.contextmanager
def _base_trainer_side(distiller):
    """copsd's trainer side as it was before its speed-ups (issue 17, item 3): the KV cache grown by
    concatenation during generation, AdamW's per-parameter loop (torch's default on CPU) and the divergence
    objectives' metric log-probs from separate lm_head passes."""
    from copsd import distill, rollout

    groups = distiller.optimizer.param_groups
    saved = [(g["fused"], g["foreach"]) for g in groups]
    rollout._IN_PLACE_CACHE = False
    distill._STATS_FROM_DIVERGENCE = False
    for g in groups:
        g["fused"], g["foreach"] = None, False
    try:
        yield
    finally:
        rollout._IN_PLACE_CACHE = True
        distill._STATS_FROM_DIVERGENCE = True
        for g, (fused, foreach) in zip(groups, saved):
            g["fused"], g["foreach"] = fused, foreach


class CopsdRunner:
    def __init__(self, name, paths, a, outdir):
        from accelerate import Accelerator

        from copsd.config import DistillConfig
        from copsd.distill import Distiller

        objective, _, variant = name.split(":")[1].partition("-")
        self.base = variant == "base"
        n = a.prompts * a.G
        cfg = DistillConfig(
            model_name_or_path=paths["student"], teacher_model_name_or_path=paths["teacher"],
            teacher_mode="checkpoint", constitution=paths["constitution"], dataset=paths["dataset"],
            output_dir=os.path.join(outdir, name.replace(":", "_")), objective=objective,
            kl_coef=0.005 if objective == "paper" else 0.0, beta=0.5,
            num_generations=a.G, per_device_train_batch_size=n, gradient_accumulation_steps=1, num_mini_batches=1,
            max_completion_length=a.new_tokens, temperature=a.temperature, top_p=1.0, top_k=0,
            learning_rate=a.lr, max_grad_norm=1.0, max_steps=10**6, report_to=[], disable_tqdm=True,
            sample_every_steps=0, backend=a.backend, seed=0, bf16=a.bf16)
        # the device explicitly: Distiller's own default (copsd.training.make_accelerator) is cuda wherever one is
        # visible; the mixed precision as make_accelerator sets it from cfg.bf16
        acc = Accelerator(mixed_precision="bf16" if a.bf16 else "no", cpu=a.device == "cpu")
        self.d = d = Distiller(cfg, accelerator=acc)
        for role, module in (("student", d.model), ("teacher", d.teacher)):
            where = next(module.parameters()).device.type
            if d.device.type != a.device or where != a.device:
                raise RuntimeError(f"{name}: copsd put the {role} on {where} (its device {d.device}), expected "
                                   f"{a.device} (accelerate's process-wide state set up for another device?)")
        self.model = d.model
        self.timer = _Timer(_sync_fn(a.device))
        self.timer.hook_optimizer(d.optimizer)
        d.acc.clip_grad_norm_ = self.timer.wrap("optim_clip", d.acc.clip_grad_norm_)
        d._teacher = self.timer.wrap("teacher_scoring", d._teacher)
        # on cuda: the stages whose end copsd's own clocks read (time_rollout, time_teacher) end synchronised
        for attr in ("_rollout", "_ref_logprobs", "_policy_logprobs"):
            setattr(d, attr, self.timer.fence(getattr(d, attr)))
        self.step_no = 0
        self.last: dict = {}

    def step(self) -> dict:
        self.timer.reset()
        t0 = self.timer.now()
        with _base_trainer_side(self.d) if self.base else contextlib.nullcontext():
            m = self.d.train_step(self.step_no)
        total = self.timer.now() - t0
        self.step_no += 1
        self.d.step = self.step_no
        t = self.timer.t
        optim = t.get("optim_step", 0.0) + t.get("optim_clip", 0.0)
        split = {"gen": m["time_rollout"], "teacher": m["time_teacher"], "loss_bwd": m["time_update"] - optim,
                 "optim": optim}
        split["other"] = total - sum(split.values())
        tokens = int(round(m["completion_length"] * self.d.per_device_completions))
        self.last = {"loss": m["loss"], "tokens": tokens, "teacher_scoring": t.get("teacher_scoring", 0.0)}
        return {"total": total, **split, "tokens": tokens, "loss": m["loss"]}


class TrlRunner:
    """A TRL trainer driven one optimizer step at a time (see the module docstring)."""

    def __init__(self, name, paths, a, outdir):
        import trl  # noqa: F401  (ImportError -> skipped by the caller)
        from datasets import Dataset

        self.name = name
        # as copsd's bf16: the trained student in fp32 under bf16 autocast (TRL's bf16=True), the teacher in bf16
        student, tok = _load(paths["student"], torch.float32)
        teacher, _ = _load(paths["teacher"], _dtype(a))
        n = a.prompts * a.G
        common_args = dict(output_dir=os.path.join(outdir, name.replace(":", "_")), per_device_train_batch_size=n,
                           gradient_accumulation_steps=1, learning_rate=a.lr, max_grad_norm=1.0,
                           lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01, report_to=[],
                           logging_steps=10**6, save_strategy="no", seed=0, use_cpu=a.device == "cpu",
                           dataloader_num_workers=0, bf16=a.bf16, gradient_checkpointing=False, disable_tqdm=True)
        self.timer = _Timer(_sync_fn(a.device))
        if name == "trl:gkd":
            GKDConfig, GKDTrainer = _trl_gkd()
            args = GKDConfig(lmbda=1.0, beta=0.5, seq_kd=False, temperature=a.temperature,
                             max_new_tokens=a.new_tokens, max_length=4096, **common_args)
            # GKD samples one answer per row and its collator wants a prompt-completion conversation (the
            # completion is replaced by the student's sample when lmbda = 1): each prompt G times
            rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": "ok"}]}
                    for r in paths["prompts"] for _ in range(a.G)]
            self.trainer = tr = GKDTrainer(model=student, teacher_model=teacher, args=args,
                                           train_dataset=Dataset.from_list(rows), processing_class=tok)
            tr.generate_on_policy_outputs = self._count_gkd(self.timer.wrap("gen", tr.generate_on_policy_outputs))
            self.timer.hook_forward(tr.teacher_model, "teacher")
        else:
            DistillationConfig, DistillationTrainer = _trl_distill()
            args = DistillationConfig(max_completion_length=a.new_tokens, temperature=a.temperature, top_p=1.0,
                                      top_k=0, beta=0.5, **common_args)
            # always on-policy, one answer per row (TRL 1.16): each prompt G times
            rows = [{"prompt": [{"role": "user", "content": r["prompt"]}]}
                    for r in paths["prompts"] for _ in range(a.G)]
            self.trainer = tr = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                                    train_dataset=Dataset.from_list(rows), processing_class=tok)
            tr._generate = self.timer.wrap("gen", tr._generate)
            teacher_module = tr.accelerator.unwrap_model(tr.teacher_model)
            hidden = tr._get_last_hidden_state

            def timed_hidden(model, *args, **kwargs):  # the teacher's backbone forward, not the student's
                if model is not teacher_module:
                    return hidden(model, *args, **kwargs)
                return self.timer.wrap("teacher", hidden)(model, *args, **kwargs)
            tr._get_last_hidden_state = timed_hidden
        # Trainer.train() sets these before its first step
        if getattr(tr, "current_gradient_accumulation_steps", None) is None:
            tr.current_gradient_accumulation_steps = 1
        tr.create_optimizer_and_scheduler(num_training_steps=10**6)
        self.timer.hook_optimizer(tr.optimizer)
        self.model = tr.model
        for role, module in (("student", self.model), ("teacher", tr.teacher_model)):
            where = next(module.parameters()).device.type
            if where != a.device:
                raise RuntimeError(f"{name}: TRL put the {role} on {where}, expected {a.device}")
        self.model.train()
        self.loader = tr.get_train_dataloader()
        self._it = iter(self.loader)
        self.step_no = 0
        self._gen_tokens = 0

    def _count_gkd(self, fn):
        def counted(*args, **kwargs):
            out = fn(*args, **kwargs)
            self._gen_tokens += int((out[2] != -100).sum())  # labels: the generated tokens up to EOS
            return out
        return counted

    def _batch(self):
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            return next(self._it)

    def step(self) -> dict:
        tr, model = self.trainer, self.model
        self.timer.reset()
        self._gen_tokens = 0
        now = self.timer.now
        t0 = now()
        inputs = self._batch()  # the collator's work (GKD tokenizes here) goes to "other"
        t_batch = now()
        loss = tr.training_step(model, inputs, None)
        t1 = now()
        t_clip = t1
        tr.accelerator.clip_grad_norm_(model.parameters(), tr.args.max_grad_norm)
        t_clip = now() - t_clip
        tr.optimizer.step()
        tr.lr_scheduler.step()
        model.zero_grad(set_to_none=True)
        total = now() - t0
        self.step_no += 1
        tr.state.global_step = self.step_no
        t = self.timer.t
        if self.name == "trl:distill":
            self._gen_tokens = int(sum(int(b["completion_mask"].sum()) for b in tr._buffered_inputs))
        gen, teacher = t.get("gen", 0.0), t.get("teacher", 0.0)
        optim = t.get("optim_step", 0.0) + t_clip
        split = {"gen": gen, "teacher": teacher, "loss_bwd": (t1 - t_batch) - gen - teacher, "optim": optim}
        split["other"] = total - sum(split.values())
        return {"total": total, **split, "tokens": self._gen_tokens, "loss": float(loss.detach())}


def _trl_gkd():
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        from trl import GKDConfig, GKDTrainer
    return GKDConfig, GKDTrainer


def _trl_distill():
    try:
        from trl import DistillationConfig, DistillationTrainer
    except ImportError:
        from trl.experimental.distillation import DistillationConfig, DistillationTrainer
    return DistillationConfig, DistillationTrainer


def make_runner(name, paths, a, outdir):
    if name.startswith("copsd:"):
        return CopsdRunner(name, paths, a, outdir)
    return TrlRunner(name, paths, a, outdir)


# ----------------------------------------------------------------------------- memory


def _read_status(key: str) -> int:
    """``key`` (VmRSS, VmHWM) of this process in bytes; 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak():
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


class _StepMemory:
    """The peak memory of one step above its start: resident memory (``VmHWM`` over ``VmRSS``) on cpu, CUDA memory
    allocated (``max_memory_allocated`` over ``memory_allocated``) on cuda.  ``process_peak``: the largest CUDA
    memory allocated in the whole process so far (bytes; 0 on cpu), kept across the per-step resets."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.process_peak = 0
        self._start = 0

    def begin(self):
        if self.cuda:
            torch.cuda.synchronize()
            self.process_peak = max(self.process_peak, torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start = _read_status("VmRSS")
            _reset_peak()

    def end(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            self.process_peak = max(self.process_peak, peak)
            return peak - self._start
        return _read_status("VmHWM") - self._start

    def whole_process_peak(self) -> int:
        if self.cuda:
            self.process_peak = max(self.process_peak, torch.cuda.max_memory_allocated())
        return self.process_peak


def _fresh_process_peak(impl: str, a) -> dict:
    """Whole-process peak RSS (``maxrss_mib``; on cuda also the peak CUDA memory allocated, ``cuda_peak_mib``) of a
    fresh process that sets up ``impl`` and runs warm-up + one step."""
    cmd = [sys.executable, os.path.abspath(__file__), "--device", a.device, "--bf16" if a.bf16 else "--no-bf16",
           "--impl", impl, "--steps", "1", "--warmup", str(a.warmup),
           "--prompts", str(a.prompts), "--G", str(a.G), "--new-tokens", str(a.new_tokens), "--hidden", str(a.hidden),
           "--layers", str(a.layers), "--heads", str(a.heads), "--kv-heads", str(a.kv_heads),
           "--intermediate", str(a.intermediate), "--vocab", str(a.vocab), "--temperature", str(a.temperature),
           "--lr", str(a.lr), "--backend", a.backend, "--constitution", a.constitution, "--threads",
           str(torch.get_num_threads()), "--quiet", "--print-maxrss"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"memory probe {impl} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- driver


def run(a) -> dict:
    """Set up every available implementation, warm up, time ``a.steps`` round-robin rounds; returns the results."""
    if a.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device visible to torch")
    if a.threads:
        torch.set_num_threads(a.threads)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    logging.getLogger("copsd").setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    tmp = tempfile.TemporaryDirectory(prefix="copsd_e2e_")
    paths = build_workspace(tmp.name, a)
    runners, skipped, checks = {}, {}, {}
    for name in a.impl:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                runners[name] = make_runner(name, paths, a, tmp.name)
        except ImportError as e:
            skipped[name] = f"not installed ({e})"
            if not a.quiet:
                print(f"# {name}: skipped, TRL is not installed or lacks this trainer ({e})", file=sys.stderr)
    times: dict[str, list[dict]] = {n: [] for n in runners}
    peak: dict[str, int] = dict.fromkeys(runners, 0)
    mem = _StepMemory(a.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, r in runners.items():
            t0 = time.perf_counter()
            before = _param_snapshot(r.model)
            for _ in range(a.warmup):
                r.step()
            checks[name] = {"changed_tensors_after_warmup": _changed(r.model, before) if a.warmup else None,
                            "trainable_tensors": len(before)}
            del before
            if not a.quiet:
                print(f"# warm-up {name}: {a.warmup} step(s) in {time.perf_counter() - t0:.1f} s, changed tensors "
                      f"{checks[name]['changed_tensors_after_warmup']}/{checks[name]['trainable_tensors']}",
                      file=sys.stderr)
        if a.device == "cuda":
            torch.cuda.empty_cache()
        for rnd in range(a.steps):
            for name, r in runners.items():
                mem.begin()
                rec = r.step()
                peak[name] = max(peak[name], mem.end())
                rec["round"] = rnd
                times[name].append(rec)
                if not a.quiet:
                    print(f"# round {rnd} {name}: {rec['total'] * 1e3:.0f} ms, {rec['tokens']} tokens, "
                          f"loss {rec['loss']:.4g}", file=sys.stderr)
    machine = common.machine()
    if a.device == "cuda":
        machine = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}); host {machine}"
    out = {"machine": machine, "args": {k: v for k, v in vars(a).items() if k != "impl"},
           "impls": list(runners), "skipped": skipped, "checks": checks, "failed": _failures(checks, times),
           "peak_extra_bytes": peak, "memory_kind": "cuda_allocated" if a.device == "cuda" else "rss",
           "process_cuda_peak_bytes": mem.whole_process_peak(), "steps": times}
    if a.memory:
        probes = {n: _fresh_process_peak(n, a) for n in runners}
        out["fresh_process_maxrss_mib"] = {n: v["maxrss_mib"] for n, v in probes.items()}
        if a.device == "cuda":
            out["fresh_process_cuda_peak_mib"] = {n: v["cuda_peak_mib"] for n, v in probes.items()}
    tmp.cleanup()
    return out


def _failures(checks: dict, times: dict) -> dict:
    """``{impl: why}`` for every implementation whose output check failed: its warm-up changed no trainable tensor,
    or a timed step's loss is not finite."""
    bad = {}
    for name, c in checks.items():
        if c["changed_tensors_after_warmup"] == 0:
            bad[name] = f"the warm-up changed none of its {c['trainable_tensors']} trainable tensors"
    for name, recs in times.items():
        if any(not math.isfinite(r["loss"]) for r in recs):
            bad[name] = bad.get(name, "") + ("; " if name in bad else "") + "non-finite loss"
    return bad


def _stage_ratio(mine: list[dict], other: list[dict], key: str) -> str:
    """Median over rounds of ``other[key] / mine[key]`` in the same round (``-`` where a time is 0)."""
    ratios = [ro[key] / rm[key] for rm, ro in zip(mine, other) if rm[key] > 0 and ro[key] > 0]
    return f"{statistics.median(ratios):.2f}" if ratios else "-"


def summarize(res: dict) -> str:
    a, impls, steps = res["args"], res["impls"], res["steps"]
    lines = [f"Machine: {res['machine']}",
             f"Shape: {a['prompts']} prompts x G={a['G']}, up to {a['new_tokens']} new tokens, temperature "
             f"{a['temperature']}; Qwen2 H={a['hidden']} L={a['layers']} heads {a['heads']}/{a['kv_heads']} "
             f"I={a['intermediate']} V={a['vocab']} (tied), {'bf16' if a.get('bf16') else 'fp32'} on "
             f"{a.get('device', 'cpu')}; constitution {a['constitution']}; "
             f"{a['steps']} timed rounds after {a['warmup']} warm-up step(s)", ""]
    if res.get("memory_kind") == "cuda_allocated":
        lines[-1:-1] = ["peak extra MiB: peak CUDA memory allocated during a step above its start; times taken after "
                        "torch.cuda.synchronize() at every stage boundary"]
    head = "| impl | step ms (median) | " + " | ".join(f"{s} ms" for s in STAGES) + \
        " | gen. tokens/step | peak extra MiB | loss (last) |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for n in impls:
        recs = steps[n]
        med = {k: statistics.median(r[k] for r in recs) for k in ("total", *STAGES)}
        toks = sorted({r["tokens"] for r in recs})
        tok_s = str(toks[0]) if len(toks) == 1 else f"{toks[0]}-{toks[-1]}"
        lines.append(f"| {n} | {med['total'] * 1e3:.0f} | " + " | ".join(f"{med[s] * 1e3:.0f}" for s in STAGES)
                     + f" | {tok_s} | {res['peak_extra_bytes'][n] / 2**20:.0f} | {recs[-1]['loss']:.4g} |")
    for n, why in res["skipped"].items():
        lines.append(f"| {n} | skipped: {why} |")
    copsd = [n for n in impls if n.startswith("copsd:")]
    peers = [n for n in impls if not n.startswith("copsd:")]
    if copsd and peers:
        lines += ["", "Same-round speed-up (peer step time / copsd step time, median over rounds; > 1: copsd faster):",
                  "", "| copsd | " + " | ".join(peers) + " |", "|---|" + "---|" * len(peers)]
        for c in copsd:
            cells = []
            for p in peers:
                ratios = [rp["total"] / rc["total"] for rc, rp in zip(steps[c], steps[p])]
                cells.append(f"{statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f})")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines += ["", "Per stage, same-round ratio (peer stage time / copsd stage time, median over rounds):", "",
                  "| copsd | peer | " + " | ".join(STAGES[:-1]) + " |", "|---|---|" + "---|" * (len(STAGES) - 1)]
        for c in copsd:
            for p in peers:
                lines.append(f"| {c} | {p} | " + " | ".join(_stage_ratio(steps[c], steps[p], s) for s in STAGES[:-1])
                             + " |")
    pairs = [(n, n + "-base") for n in impls if n + "-base" in impls]
    if pairs:
        lines += ["", "Before / after in the same rounds (``-base`` time / time, median over rounds; > 1: faster "
                  "now):", "", "| copsd | step | " + " | ".join(STAGES[:-1]) + " |",
                  "|---|---|" + "---|" * (len(STAGES) - 1)]
        for n, b in pairs:
            lines.append(f"| {n} | {_stage_ratio(steps[n], steps[b], 'total')} | "
                         + " | ".join(_stage_ratio(steps[n], steps[b], s) for s in STAGES[:-1]) + " |")
    if res.get("fresh_process_maxrss_mib"):
        lines += ["", "Whole-process peak RSS in a fresh process (imports, models, warm-up, one step): "
                  + ", ".join(f"{n} {v:.0f} MiB" for n, v in res["fresh_process_maxrss_mib"].items())]
    if res.get("fresh_process_cuda_peak_mib"):
        lines += ["", "Whole-process peak CUDA memory allocated in a fresh process (models, warm-up, one step): "
                  + ", ".join(f"{n} {v:.0f} MiB" for n, v in res["fresh_process_cuda_peak_mib"].items())]
    lines += ["", "Weights changed by the warm-up step(s) (trainable tensors): "
              + ", ".join(f"{n} {c['changed_tensors_after_warmup']}/{c['trainable_tensors']}"
                          for n, c in res["checks"].items())]
    for n, why in res.get("failed", {}).items():
        lines.append(f"FAILED {n}: {why}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", nargs="+", default=list(IMPLS), choices=IMPLS + BASELINES)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cpu (the default; copsd and TRL kept on the CPU even where a GPU is visible) or cuda")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 (copsd: DistillConfig(bf16=True); TRL: bf16=True, its teacher loaded in bf16)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--G", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--backend", default="auto", help="copsd's loss backend (auto, cpu, reference, ...)")
    p.add_argument("--constitution", default="small",
                   help="'small' (two short rules, the default), 'default' (copsd's bundled constitution) or a path")
    p.add_argument("--steps", type=int, default=5, help="timed round-robin rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per implementation before the rounds")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--memory", action="store_true", help="also each implementation's peak RSS in a fresh process")
    p.add_argument("--out", help="append the Markdown table to this file")
    p.add_argument("--json", help="write all per-step records here")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--print-maxrss", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for name in ("prompts", "G", "new_tokens", "steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.warmup < 0:
        p.error("--warmup must be >= 0")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible to torch")
    return a


def main(argv=None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    a = parse_args(argv)
    res = run(a)
    if a.print_maxrss:
        # VmHWM, not ru_maxrss: Linux carries the parent's resident size into ru_maxrss across fork + exec
        print(json.dumps({"maxrss_mib": _read_status("VmHWM") / 2**20,
                          "cuda_peak_mib": res["process_cuda_peak_bytes"] / 2**20}))
        return res
    text = summarize(res)
    print(text)
    if a.out:
        with open(a.out, "a", encoding="utf-8") as f:
            f.write(text + "\n\n")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    if res["failed"]:
        print(f"bench_e2e: output check FAILED for {', '.join(res['failed'])}", file=sys.stderr)
        sys.exit(1)
    return res


if __name__ == "__main__":
    main()
