"""Stage 2: constitution-conditioned on-policy distillation (COPSD).

One step, in the order of the paper (docs/method.md):

1. take the next prompts (each process a strided share of the global batch);
2. roll out G completions per prompt from the student (student view, no constitution);
3. score every completion with the frozen teacher, which sees the constitution in the user turn
   before the query (teacher view), the response appended unchanged;
4. update the student on the chosen objective over ``num_mini_batches`` optimizer steps.

The loss ops take hidden states and the lm_head weight; no ``[tokens, vocab]`` tensor is built here.
Rollout sampling uses one generator per (seed, step, prompt), so a prompt's samples do not depend on
which process drew it or on a resume.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass

import torch

from copsd import _hf
from copsd.checkpoint import (
    list_checkpoints,
    load_extra,
    load_model_weights,
    load_training_state,
    model_card,
    resolve_resume,
    save_checkpoint,
)
from copsd.config import DistillConfig, TrainConfig, to_dict
from copsd.constitution import check_view_consistency, load_constitution, render_views, require_chat_template
from copsd.data import load_prompt_rows
from copsd.objectives import (
    PaperParams,
    divergence_loss,
    fused_paper_loss,
    group_token_zscore,
    sampled_logprobs,
    token_rewards,
)

logger = logging.getLogger("copsd")


# --------------------------------------------------------------------------- shared helpers (also Stage 1)

def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    # cpu=True where there is no GPU: it is what lets accelerate pick gloo (MULTI_CPU) under torchrun
    return Accelerator(mixed_precision="bf16" if cfg.bf16 else "no", cpu=not torch.cuda.is_available())


def load_tokenizer(path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    require_chat_template(tok)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer of {path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, *, trust_remote_code: bool, dtype=torch.float32, device=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(device) if device is not None else model


def prepare_trainable(model, cfg: TrainConfig):
    """Gradient checkpointing and LoRA (peft) as configured; returns the (maybe wrapped) model."""
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
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.lora_target_modules or "all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    return model


def hf_model(model):
    """The transformers model inside a peft wrapper (LoRA layers still active), or the model itself."""
    return model.get_base_model() if is_peft(model) else model


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def make_optimizer(model, cfg: TrainConfig):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)


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

    def forward(self, input_ids, attention_mask):
        decoder, head = _hf.decoder_and_head(hf_model(self.model))
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state, head.weight


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


class MetricsLogger:
    """Main process only: metrics JSONL (truncated to the resumed step), TensorBoard if installed, samples."""

    def __init__(self, output_dir: str, report_to: list[str], start_step: int, enabled: bool):
        self.enabled = enabled
        self.tb = None
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.samples_path = os.path.join(output_dir, "samples.jsonl")
        self.use_jsonl = "jsonl" in report_to and "none" not in report_to
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
                logger.info("tensorboard is not installed; logging to metrics.jsonl only")

    def log(self, step: int, metrics: dict):
        if not self.enabled:
            return
        if self.use_jsonl:
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


def save_final(output_dir: str, model, tokenizer, constitution, card: str):
    """HF model loadable by transformers (LoRA merged; the adapter kept in ``adapter/``)."""
    os.makedirs(output_dir, exist_ok=True)
    if is_peft(model):
        model.save_pretrained(os.path.join(output_dir, "adapter"))
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(output_dir)
    else:
        model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)
    if constitution.path:
        shutil.copyfile(constitution.path, os.path.join(output_dir, "constitution" +
                                                        os.path.splitext(constitution.path)[1]))
    with open(os.path.join(output_dir, "constitution.json"), "w", encoding="utf-8") as f:
        json.dump(constitution.to_dict(), f, indent=2, ensure_ascii=False)


def step_seed(seed: int, step: int, index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{step}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The data order of one epoch: a permutation fixed by (seed, epoch), so any position can be recomputed."""
    g = torch.Generator().manual_seed(step_seed(seed, -1, epoch))
    return tuple(torch.randperm(n, generator=g).tolist())


# --------------------------------------------------------------------------- Stage 2

@dataclass
class _Sample:
    prompt: int          # index into the dataset rows
    group: int           # local prompt-group id within this step
    student_ctx: list[int]
    teacher_ctx: list[int]
    completion: list[int]
    rollout_logp: torch.Tensor
    finish: str


class Distiller:
    """``Distiller(cfg).train()`` runs Stage 2; models, tokenizer, teacher and detector may be passed in."""

    def __init__(self, cfg: DistillConfig, *, refusal_detector=None, accelerator=None):
        cfg.validate()
        self.cfg = cfg
        self.acc = accelerator or make_accelerator(cfg)
        self.device = self.acc.device
        self.logger = None  # MetricsLogger, opened by train(); train_step() alone logs nothing
        self.constitution = load_constitution(cfg.constitution)
        self.rows = load_prompt_rows(cfg.dataset)
        self.tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code)
        if refusal_detector is None:
            from copsd.textmetrics import load_refusal_detector

            refusal_detector = load_refusal_detector(cfg.refusal_detector)
        self.refusal = refusal_detector
        frozen_dtype = torch.bfloat16 if cfg.bf16 else torch.float32

        student = load_causal_lm(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code,
                                 device=self.device)
        self.ref = None
        if cfg.kl_coef > 0 or cfg.teacher_mode == "initial":
            self.ref = copy.deepcopy(student).to(frozen_dtype).eval().requires_grad_(False)
        if cfg.teacher_mode == "checkpoint":
            self.teacher = load_causal_lm(cfg.teacher_model_name_or_path, trust_remote_code=cfg.trust_remote_code,
                                          dtype=frozen_dtype, device=self.device).eval().requires_grad_(False)
            from copsd.teacher import check_compatible

            teacher_tok = load_tokenizer(cfg.teacher_model_name_or_path, cfg.trust_remote_code)
            check_compatible(student, self.teacher, self.tokenizer, teacher_tok)
        elif cfg.teacher_mode == "initial":
            self.teacher = self.ref
        self.model = prepare_trainable(student, cfg)
        if cfg.teacher_mode == "ema":  # a copy of the trainable model (LoRA included) updated after each step
            self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
            self.teacher = hf_model(self.ema)
        from copsd.teacher import TeacherScorer

        self.scorer = TeacherScorer(self.teacher, prefix_reuse=cfg.prefix_reuse)
        self.t_scale, self.t_softcap = _hf.logit_transform(self.teacher.config)
        self.s_scale, self.s_softcap = _hf.logit_transform(hf_model(self.model).config)

        world = self.acc.num_processes
        self.per_device_completions = (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
                                       * cfg.num_mini_batches)
        self.prompts_per_device = self.per_device_completions // cfg.num_generations
        self.prompts_per_step = self.prompts_per_device * world
        if cfg.max_steps > 0:
            self.max_steps = cfg.max_steps
        else:
            self.max_steps = max(1, math.ceil(cfg.num_train_epochs * len(self.rows) / self.prompts_per_step))
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, self.max_steps * cfg.num_mini_batches)
        self.policy = self.acc.prepare_model(PolicyHidden(self.model))
        self._render_cache: dict[int, tuple[list[int], list[int]]] = {}
        self.step = 0
        self.initial: dict = {}

    # ------------------------------------------------------------------ setup checks

    def check_views(self):
        """Render one sample per kind in both views; fail if the response token ids differ."""
        seen = set()
        for row in self.rows:
            if row.kind in seen:
                continue
            seen.add(row.kind)
            response = row.reference or "sure , here is a short answer ."
            check_view_consistency(self.tokenizer, row.messages, response, self._constitution_text(row),
                                   self.cfg.teacher_template)

    def _constitution_text(self, row):
        return self.constitution.text_for(row.category, row.constitution)

    def _views(self, i: int):
        if i not in self._render_cache:
            row = self.rows[i]
            self._render_cache[i] = render_views(self.tokenizer, row.messages, self._constitution_text(row),
                                                 self.cfg.teacher_template)
        return self._render_cache[i]

    # ------------------------------------------------------------------ data position

    def _prompt_indices(self, step: int) -> list[int]:
        """This process's prompts for ``step`` (0-based): a strided share of the global batch."""
        n, world, rank = len(self.rows), self.acc.num_processes, self.acc.process_index
        out = []
        for k in range(self.prompts_per_device):
            g = step * self.prompts_per_step + rank + k * world
            out.append(epoch_order(n, self.cfg.seed, g // n)[g % n])
        return out

    # ------------------------------------------------------------------ one step

    @torch.no_grad()
    def _rollout(self, step: int, indices: list[int]) -> list[_Sample]:
        from copsd.rollout import generate

        cfg, tok = self.cfg, self.tokenizer
        samples = []
        world, rank = self.acc.num_processes, self.acc.process_index
        per_call = len(indices)
        if cfg.generation_batch_size is not None:
            per_call = cfg.generation_batch_size // cfg.num_generations
        for k0 in range(0, len(indices), per_call):
            ks = list(range(k0, min(len(indices), k0 + per_call)))
            views = [self._views(indices[k]) for k in ks]
            # one generator per prompt, seeded by (seed, step, the prompt's global index): a prompt's draws do
            # not depend on which prompts share its generation call or on the process count
            gens = [torch.Generator(device=self.device).manual_seed(
                step_seed(cfg.seed, step, step * self.prompts_per_step + rank + k * world)) for k in ks]
            with self.acc.autocast():
                ro = generate(hf_model(self.model), [s_ids for s_ids, _ in views], num_generations=cfg.num_generations,
                              max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                              top_p=cfg.top_p, top_k=cfg.top_k, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, generator=gens)
            for p, c, lp, fin in zip(ro.prompt_index, ro.completion_ids, ro.logprobs, ro.finish_reason):
                k = ks[p]
                s_ids, t_ids = views[p]
                samples.append(_Sample(indices[k], k, s_ids, t_ids, list(c), lp.float().to(self.device), fin))
        return samples

    @torch.no_grad()
    def _teacher(self, samples):
        out = self.scorer.score([s.teacher_ctx for s in samples], [s.completion for s in samples])
        return out.hidden

    @torch.no_grad()
    def _ref_logprobs(self, samples) -> torch.Tensor:
        decoder, head = _hf.decoder_and_head(self.ref)
        scale, softcap = _hf.logit_transform(self.ref.config)
        out = []
        bs = self.cfg.per_device_train_batch_size
        for j in range(0, len(samples), bs):
            part = samples[j:j + bs]
            ids, mask = pad_right([s.student_ctx + s.completion for s in part], self.tokenizer.pad_token_id,
                                  self.device)
            h = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            h = gather_rows(h, [len(s.student_ctx) - 1 for s in part], [len(s.completion) for s in part])
            tgt = torch.tensor([t for s in part for t in s.completion], device=self.device)
            lp, _ = sampled_logprobs(h.to(head.weight.dtype), head.weight, tgt, temperature=self.cfg.temperature,
                                     logit_scale=scale, softcap=softcap, backend=self.cfg.backend)
            out.append(lp.float())
        return torch.cat(out)

    def train_step(self, step: int) -> dict:
        cfg, acc = self.cfg, self.acc
        t0 = time.perf_counter()
        indices = self._prompt_indices(step)
        samples = self._rollout(step, indices)
        t1 = time.perf_counter()
        teacher_hidden = self._teacher(samples)
        tw = self.teacher.get_output_embeddings().weight
        ids_all = torch.tensor([t for s in samples for t in s.completion], device=self.device)
        lengths = [len(s.completion) for s in samples]
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        rollout_logp = torch.cat([s.rollout_logp for s in samples])
        with torch.no_grad():
            teacher_logp, _ = sampled_logprobs(teacher_hidden.to(tw.dtype), tw, ids_all, temperature=cfg.temperature,
                                               logit_scale=self.t_scale, softcap=self.t_softcap, backend=cfg.backend)
            teacher_logp = teacher_logp.float()
        mask_all = torch.ones_like(ids_all, dtype=torch.bool)
        group_all = torch.tensor([s.group for s in samples for _ in s.completion], device=self.device)
        rewards = token_rewards(teacher_logp, rollout_logp, mask_all, cfg.reward_clip_low, cfg.reward_clip_high,
                                cfg.reward_bonus)
        adv = group_token_zscore(rewards, group_all, mask_all)
        ref_logp = self._ref_logprobs(samples) if cfg.kl_coef > 0 else None
        t2 = time.perf_counter()

        sums = _Sums(self.device)
        params = PaperParams(cfg.reward_clip_low, cfg.reward_clip_high, cfg.reward_bonus, cfg.epsilon,
                             cfg.epsilon_high, cfg.dual_clip, cfg.kl_coef)
        per_mb = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        self.policy.train()
        for mb in range(cfg.num_mini_batches):
            mb_samples = list(range(mb * per_mb, (mb + 1) * per_mb))
            local_tokens = sum(lengths[j] for j in mb_samples)
            normalizer = float(acc.reduce(torch.tensor(float(local_tokens), device=self.device), "sum"))
            normalizer = max(normalizer, 1.0)
            for a in range(cfg.gradient_accumulation_steps):
                micro = mb_samples[a * cfg.per_device_train_batch_size:(a + 1) * cfg.per_device_train_batch_size]
                last = a == cfg.gradient_accumulation_steps - 1
                ctx = acc.no_sync(self.policy) if not last else _nullcontext()
                with ctx:
                    loss = self._micro_loss(samples, micro, offsets, ids_all, rollout_logp, adv, ref_logp,
                                            teacher_hidden, tw, normalizer, params, sums)
                    acc.backward(loss * acc.num_processes)  # DDP averages gradients over processes
            if cfg.max_grad_norm > 0:
                gn = acc.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], cfg.max_grad_norm)
                sums.add("grad_norm", float(gn) / acc.num_processes, 1.0 / acc.num_processes)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if cfg.teacher_mode == "ema":
                self._ema_update()
        t3 = time.perf_counter()

        # ---- metrics (token sums and counts reduced over processes)
        ntok = float(len(ids_all))
        sums.add("reward", float(rewards.sum()), ntok)
        sums.add("reward_sq", float((rewards ** 2).sum()), ntok)
        sums.add("advantage_abs", float(adv.abs().sum()), ntok)
        sums.add("teacher_logp", float(teacher_logp.sum()), ntok)
        sums.add("rollout_logp", float(rollout_logp.sum()), ntok)
        sums.add("completion_length", float(ntok), float(len(samples)))
        sums.add("truncated", float(sum(s.finish == "length" for s in samples)), float(len(samples)))
        self._text_metrics(samples, sums)
        m = sums.reduce(acc)
        m["reward_std"] = math.sqrt(max(m.pop("reward_sq") - m["reward"] ** 2, 0.0))
        # sampled-token estimate of KL(student || teacher) on the rollouts (the reward without clip and bonus)
        m["teacher_kl_estimate"] = m["rollout_logp"] - m["teacher_logp"]
        m["learning_rate"] = self.scheduler.get_last_lr()[0]
        total_tokens = m["completion_length"] * len(samples) * acc.num_processes
        m["time_rollout"], m["time_teacher"], m["time_update"] = t1 - t0, t2 - t1, t3 - t2
        m["tokens_per_second"] = total_tokens / max(t3 - t0, 1e-9)
        if cfg.sample_every_steps and (step + 1) % cfg.sample_every_steps == 0 or step == 0:
            self._sample_table(step + 1, samples, rewards, offsets)
        return m

    def _micro_loss(self, samples, micro, offsets, ids_all, rollout_logp, adv, ref_logp, teacher_hidden, tw,
                    normalizer, params, sums):
        cfg = self.cfg
        part = [samples[j] for j in micro]
        ids, mask = pad_right([s.student_ctx + s.completion for s in part], self.tokenizer.pad_token_id,
                              self.device)
        with self.acc.autocast():
            hidden, weight = self.policy(ids, mask)
        h = gather_rows(hidden, [len(s.student_ctx) - 1 for s in part], [len(s.completion) for s in part])
        h = h.to(weight.dtype)
        sel = torch.cat([torch.arange(offsets[j], offsets[j + 1], device=self.device) for j in micro])
        tgt = ids_all[sel]
        tmask = torch.ones_like(tgt, dtype=torch.bool)
        ref = ref_logp[sel] if ref_logp is not None else None
        lkw = dict(temperature=cfg.temperature, logit_scale=self.s_scale, softcap=self.s_softcap, backend=cfg.backend)
        if cfg.objective == "paper":
            # the per-token loss goes into the fused op: its gradient is taken in the forward pass
            loss, stats, logp, ent = fused_paper_loss(h, weight, tgt, rollout_logp[sel], adv[sel], tmask, normalizer,
                                                      ref_logp=ref, params=params, **lkw)
            sums.add("pg_loss", float(stats["pg_loss_sum"]), float(len(tgt)))
            sums.add("clip_fraction", float(stats["clip_sum"]), float(len(tgt)))
            sums.add("dual_clip_fraction", float(stats["dual_clip_sum"]), float(len(tgt)))
        else:
            logp, ent = sampled_logprobs(h, weight, tgt, entropy=True, **lkw)
            th = teacher_hidden[sel].to(tw.dtype)
            loss, stats = divergence_loss(cfg.objective, h, weight, th, tw, tmask, normalizer, logp=logp,
                                          ref_logp=ref, kl_coef=cfg.kl_coef, beta=cfg.beta, topk=cfg.topk,
                                          temperature=cfg.temperature, logit_scale=self.s_scale,
                                          softcap=self.s_softcap, backend=cfg.backend)
            sums.add("divergence", float(stats["divergence_sum"]), float(len(tgt)))
        if "kl_sum" in stats:
            sums.add("kl", float(stats["kl_sum"]), float(len(tgt)))
        # loss is (token sum / global step tokens): summed over micro-batches and processes it is the token-mean
        k = cfg.num_mini_batches
        sums.add("loss", float(loss.detach()) / k, 1.0 / (k * cfg.gradient_accumulation_steps * self.acc.num_processes))
        sums.add("entropy", float(ent.detach().sum()), float(len(tgt)))
        with torch.no_grad():
            sums.add("ratio", float(torch.exp(logp.detach() - rollout_logp[sel]).sum()), float(len(tgt)))
        return loss

    @torch.no_grad()
    def _ema_update(self):
        d = self.cfg.ema_decay
        for pe, p in zip(self.ema.parameters(), self.model.parameters()):
            if p.requires_grad:
                pe.mul_(d).add_(p.detach().to(pe.dtype), alpha=1 - d)

    def _text_metrics(self, samples, sums):
        from copsd.textmetrics import leak_rate, self_bleu

        tok = self.tokenizer
        texts = [tok.decode(s.completion, skip_special_tokens=True) for s in samples]
        prompts = [self.rows[s.prompt].messages[-1]["content"] for s in samples]
        flags = self.refusal(prompts, texts)
        for kind in ("harmful", "benign", "general"):
            sel = [f for f, s in zip(flags, samples) if self.rows[s.prompt].kind == kind]
            sums.add(f"refusal_rate_{kind}", float(sum(sel)), float(len(sel)))
        groups: dict[int, list[str]] = {}
        for t, s in zip(texts, samples):
            groups.setdefault(s.group, []).append(t)
        bleus = [self_bleu(g) for g in groups.values() if len(g) > 1]
        bleus = [b for b in bleus if math.isfinite(b)]
        sums.add("self_bleu", float(sum(bleus)), float(len(bleus)))
        lr = leak_rate(texts, self.constitution.all_texts())
        if math.isfinite(lr):
            sums.add("constitution_leak_rate", lr * len(texts), float(len(texts)))

    def _sample_table(self, step, samples, rewards, offsets):
        if not self.acc.is_main_process or self.logger is None:
            return
        rows, seen = [], set()
        flags_for = {}
        for j, s in enumerate(samples):
            if s.group in seen:
                continue
            seen.add(s.group)
            prompt = self.rows[s.prompt].messages[-1]["content"]
            text = self.tokenizer.decode(s.completion, skip_special_tokens=True)
            flags_for[j] = self.refusal([prompt], [text])[0]
            r = rewards[offsets[j]:offsets[j + 1]]
            rows.append({"prompt": prompt, "kind": self.rows[s.prompt].kind, "completion": text,
                         "reward": round(float(r.mean()), 4) if len(r) else 0.0, "refusal": flags_for[j]})
        self.logger.samples(step, rows)

    # ------------------------------------------------------------------ alarms

    def _alarms(self, m: dict) -> list[str]:
        cfg, out = self.cfg, []
        if not self.initial:
            self.initial = {k: m[k] for k in ("completion_length", "entropy", "refusal_rate_benign") if k in m}
            return out
        init = self.initial
        if m.get("completion_length", math.inf) < cfg.alarm_length_fraction * init.get("completion_length", 0):
            out.append(f"response length {m['completion_length']:.1f} fell below {cfg.alarm_length_fraction:g} x "
                       f"its initial {init['completion_length']:.1f}")
        if m.get("entropy", math.inf) < cfg.alarm_entropy_fraction * init.get("entropy", 0):
            out.append(f"token entropy {m['entropy']:.3f} fell below {cfg.alarm_entropy_fraction:g} x its initial "
                       f"{init['entropy']:.3f}")
        rb, rb0 = m.get("refusal_rate_benign"), init.get("refusal_rate_benign")
        if rb is not None and rb0 is not None and math.isfinite(rb) and math.isfinite(rb0) \
                and rb > rb0 + cfg.alarm_benign_refusal_increase:
            out.append(f"benign refusal rate {rb:.2f} rose more than {cfg.alarm_benign_refusal_increase:g} above its "
                       f"initial {rb0:.2f}")
        return out

    # ------------------------------------------------------------------ checkpoints

    def _state(self) -> dict:
        return {"global_step": self.step, "optimizer_steps": self.step * self.cfg.num_mini_batches,
                "max_steps": self.max_steps, "prompts_consumed": self.step * self.prompts_per_step,
                "num_rows": len(self.rows), "prompts_per_step": self.prompts_per_step,
                "num_processes": self.acc.num_processes, "constitution_sha256": self.constitution.sha256,
                "initial_metrics": self.initial, "stage": "distill", "config": to_dict(self.cfg)}

    def _card(self) -> str:
        return model_card(title="COPSD student", base_model=self.cfg.model_name_or_path,
                          constitution=self.constitution, stage="Stage 2, on-policy distillation", step=self.step,
                          config=to_dict(self.cfg))

    def save(self):
        extra = {"ema_teacher": dict(self.ema.state_dict())} if self.cfg.teacher_mode == "ema" else None
        save_checkpoint(self.cfg.output_dir, self.step, model=self.acc.unwrap_model(self.policy).model,
                        tokenizer=self.tokenizer, optimizer=self.optimizer, scheduler=self.scheduler,
                        state=self._state(), extra_tensors=extra, model_card=self._card(),
                        is_main=self.acc.is_main_process, rank=self.acc.process_index,
                        barrier=self.acc.wait_for_everyone, save_total_limit=self.cfg.save_total_limit)

    def resume(self, ckpt: str):
        state = load_training_state(ckpt, self.optimizer, self.scheduler, rank=self.acc.process_index)
        if state.get("constitution_sha256") != self.constitution.sha256:
            raise ValueError(f"resume_from_checkpoint: {ckpt} was trained with constitution "
                             f"{state.get('constitution_sha256')}, but {self.cfg.constitution} hashes to "
                             f"{self.constitution.sha256}")
        if (state.get("num_rows"), state.get("prompts_per_step")) != (len(self.rows), self.prompts_per_step):
            raise ValueError(f"resume_from_checkpoint: {ckpt} was written with {state.get('num_rows')} rows and "
                             f"{state.get('prompts_per_step')} prompts per step; now {len(self.rows)} and "
                             f"{self.prompts_per_step}: the data position cannot be restored")
        load_model_weights(self.model, ckpt)
        if self.cfg.teacher_mode == "ema":
            self.ema.load_state_dict(load_extra(ckpt, "ema_teacher"))
        self.step = int(state["global_step"])
        self.initial = state.get("initial_metrics") or {}

    # ------------------------------------------------------------------ loop

    def train(self) -> dict:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.acc
        self.check_views()
        ckpt = resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
        if ckpt:
            self.resume(ckpt)
            logger.info("resumed from %s at step %d", ckpt, self.step)
        self.logger = MetricsLogger(cfg.output_dir, cfg.report_to, self.step, acc.is_main_process)
        bar = tqdm(total=self.max_steps, initial=self.step, desc="copsd distill",
                   disable=cfg.disable_tqdm or not acc.is_main_process, dynamic_ncols=True)
        last = {}
        try:
            while self.step < self.max_steps:
                m = self.train_step(self.step)
                self.step += 1
                alarms = self._alarms(m)
                m["alarms"] = len(alarms)
                last = m
                if self.step % cfg.logging_steps == 0 or self.step == self.max_steps:
                    self.logger.log(self.step, m)
                for a in alarms:
                    logger.warning("copsd collapse alarm at step %d: %s", self.step, a)
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", len=f"{m['completion_length']:.0f}",
                                ent=f"{m['entropy']:.2f}")
                if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < self.max_steps:
                    self.save()
                if alarms and cfg.stop_on_collapse:
                    logger.warning("stop_on_collapse: stopping at step %d", self.step)
                    self.save()
                    break
        finally:
            bar.close()
            self.logger.close()
        if self.step >= self.max_steps:
            if cfg.save_steps:
                self.save()
            if acc.is_main_process:
                save_final(cfg.output_dir, acc.unwrap_model(self.policy).model, self.tokenizer, self.constitution,
                           self._card())
            acc.wait_for_everyone()
        return last


class _Sums:
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


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def distill(cfg: DistillConfig, **kwargs) -> dict:
    """Run Stage 2 and return the last step's metrics."""
    return Distiller(cfg, **kwargs).train()


__all__ = ["Distiller", "distill", "list_checkpoints"]
