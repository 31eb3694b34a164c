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

With a vision-language model (``copsd.vlm``) a prompt's images go with it everywhere: the rollout, the
teacher's scoring (the constitution is a text part before the images) and every student forward, which
takes the images' ``pixel_values`` and lets the model place its 3-D rotary positions.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import time
from dataclasses import dataclass

import torch

from copsd import _hf, fsdp
from copsd.checkpoint import list_checkpoints, load_extra
from copsd.config import DistillConfig
from copsd.constitution import check_view_consistency, render_views
from copsd.data import load_prompt_rows, message_text
from copsd.objectives import (
    PaperParams,
    divergence_loss,
    fused_paper_loss,
    group_token_zscore,
    sampled_logprobs,
    token_rewards,
)
from copsd.training import (
    StageTrainer,
    Sums,
    check_model_path,
    check_sharded_images,
    gather_rows,
    hf_model,
    image_token_counts,
    load_causal_lm,
    load_stage_constitution,
    load_tokenizer,
    load_vision,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    micro_batches,
    pad_right,
    preflight_prompts,
    prepare_trainable,
    step_seed,
    strided_share,
    wrap_policy,
)

logger = logging.getLogger("copsd")


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
    vision: object = None  # copsd.multimodal.VisionInputs of the prompt's images (shared by its G samples)


# Divergence objectives take the metrics' sampled-token log-probs and entropy from the divergence op's own
# logits (``linear_divergence(..., stats_ids=)``); False: separate log-prob passes (same values to rounding).
_STATS_FROM_DIVERGENCE = True


class Distiller(StageTrainer):
    """``Distiller(cfg).train()`` runs Stage 2; models, tokenizer, teacher and detector may be passed in."""

    stage = "distill"
    card_title = "COPSD student"
    card_stage = "Stage 2, on-policy distillation"

    def __init__(self, cfg: DistillConfig, *, refusal_detector=None, accelerator=None):
        cfg.validate()
        self.cfg = cfg
        check_model_path("model_name_or_path", cfg.model_name_or_path)
        if cfg.teacher_mode == "checkpoint":
            check_model_path("teacher_model_name_or_path", cfg.teacher_model_name_or_path)
        self.acc = accelerator or make_accelerator(cfg)
        self.device = self.acc.device
        self.logger = None  # MetricsLogger, opened by train(); train_step() alone logs nothing
        self.constitution = load_stage_constitution(cfg)
        problems: list[str] = []  # malformed rows, reported together with the rendering and length checks
        rows = load_prompt_rows(cfg.dataset, cfg.default_kind, problems=problems)
        self.tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code)
        self.vision = load_vision(cfg.model_name_or_path, self.tokenizer, cfg.trust_remote_code)
        # every row rendered in both views and length-checked before any weights are loaded
        contexts = {"student": _context_of(cfg.model_name_or_path, cfg.trust_remote_code)}
        contexts["teacher"] = (_context_of(cfg.teacher_model_name_or_path, cfg.trust_remote_code)
                               if cfg.teacher_mode == "checkpoint" else contexts["student"])
        self.rows, views = preflight_prompts(rows, self.tokenizer, self.constitution, cfg,
                                             completion_tokens=cfg.max_completion_length, contexts=contexts,
                                             problems=problems, vision=self.vision)
        check_sharded_images(self.rows, self.vision, f"dataset {cfg.dataset}")
        self._render_cache: dict[int, tuple[list[int], list[int]]] = dict(enumerate(views))
        self.teacher_constitution = None
        if cfg.teacher_mode == "checkpoint":
            self.teacher_constitution = _teacher_provenance(cfg.teacher_model_name_or_path, self.constitution)
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
                                          dtype=frozen_dtype, device=self.device,
                                          key="teacher_model_name_or_path").eval().requires_grad_(False)
            from copsd.teacher import check_compatible

            teacher_tok = load_tokenizer(cfg.teacher_model_name_or_path, cfg.trust_remote_code,
                                         key="teacher_model_name_or_path")
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
        self.judge = None
        if cfg.objective == "hybrid":  # the constitution-conditioned teacher also judges whole answers
            from copsd.hybrid import OutcomeJudge, reward_type, warn_image_rows

            self.judge = OutcomeJudge(self.teacher, self.tokenizer, max_new_tokens=cfg.judge_max_new_tokens,
                                      batch_size=cfg.judge_batch_size)
            self.reward_types = [reward_type(r, cfg.judge_kinds, cfg.judge_categories) for r in self.rows]
            warn_image_rows(self.rows, self.reward_types)

        world = self.acc.num_processes
        self.per_device_completions = (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
                                       * cfg.num_mini_batches)
        self.prompts_per_device = self.per_device_completions // cfg.num_generations
        self.prompts_per_step = self.prompts_per_device * world
        if cfg.max_steps > 0:
            self.max_steps = cfg.max_steps
        else:
            self.max_steps = max(1, math.ceil(cfg.num_train_epochs * len(self.rows) / self.prompts_per_step))
        # before the optimizer: FSDP2 replaces the parameters
        self.policy = wrap_policy(self.acc, self.model, cfg, self.tokenizer.pad_token_id)
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, self.max_steps * cfg.num_mini_batches)
        self.step = 0
        self.initial: dict = {}

    # ------------------------------------------------------------------ setup checks

    def prepare(self):
        self.check_views()

    def check_views(self):
        """Render one sample per kind in both views; fail if the response token ids differ."""
        seen = set()
        for row in self.rows:
            if row.kind in seen:
                continue
            seen.add(row.kind)
            response = row.reference or "sure , here is a short answer ."
            check_view_consistency(self.tokenizer, row.messages, response, self._constitution_text(row),
                                   self.cfg.teacher_template, image_tokens=image_token_counts(row, self.vision))

    def _constitution_text(self, row):
        return self.constitution.text_for(row.category, row.constitution)

    def _views(self, i: int):
        if i not in self._render_cache:
            row = self.rows[i]
            self._render_cache[i] = render_views(self.tokenizer, row.messages, self._constitution_text(row),
                                                 self.cfg.teacher_template,
                                                 image_tokens=image_token_counts(row, self.vision))
        return self._render_cache[i]

    def _vision_of(self, i: int):
        """``VisionInputs`` of row ``i``'s images (None for a text row)."""
        row = self.rows[i]
        return self.vision.encode(row.images, row.where) if self.vision is not None and row.images else None

    def _vision_kwargs(self, part) -> dict:
        """The images of samples ``part`` as ``PolicyHidden`` arguments; {} for a text model."""
        if self.vision is None:
            return {}
        return {"vision": [s.vision for s in part], "context_lens": [len(s.student_ctx) for s in part]}

    # ------------------------------------------------------------------ data position

    def _prompt_indices(self, step: int) -> list[int]:
        """This process's prompts for ``step`` (0-based): a strided share of the global batch."""
        return strided_share(step, self.prompts_per_device, len(self.rows), self.cfg.seed, self.acc.process_index,
                             self.acc.num_processes)

    # ------------------------------------------------------------------ one step

    @torch.no_grad()
    def _rollout(self, step: int, indices: list[int]) -> list[_Sample]:
        from copsd.rollout import generate

        cfg, tok = self.cfg, self.tokenizer
        samples = []
        world, rank = self.acc.num_processes, self.acc.process_index
        per_call = len(indices)
        # a sharded student gathers its parameters in every forward: all processes decode the same number of steps
        all_done = functools.partial(fsdp.all_processes_done, device=self.device) if self.sharded() else None
        if cfg.generation_batch_size is not None:
            per_call = cfg.generation_batch_size // cfg.num_generations
        for k0 in range(0, len(indices), per_call):
            ks = list(range(k0, min(len(indices), k0 + per_call)))
            views = [self._views(indices[k]) for k in ks]
            visions = [self._vision_of(indices[k]) for k in ks]
            extra = {"vision": visions} if any(v is not None for v in visions) else {}
            # one generator per prompt, seeded by (seed, step, the prompt's global index): a prompt's draws do
            # not depend on which prompts share its generation call or on the process count
            gens = [torch.Generator(device=self.device).manual_seed(
                step_seed(cfg.seed, step, step * self.prompts_per_step + rank + k * world)) for k in ks]
            with self.acc.autocast():
                ro = generate(hf_model(self.model), [s_ids for s_ids, _ in views], num_generations=cfg.num_generations,
                              max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                              top_p=cfg.top_p, top_k=cfg.top_k, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, generator=gens, all_done=all_done, **extra)
            for p, c, lp, fin in zip(ro.prompt_index, ro.completion_ids, ro.logprobs, ro.finish_reason):
                k = ks[p]
                s_ids, t_ids = views[p]
                samples.append(_Sample(indices[k], k, s_ids, t_ids, list(c), lp.float().to(self.device), fin,
                                       visions[p]))
        return samples

    @torch.no_grad()
    def _teacher(self, samples):
        extra = {"vision": [s.vision for s in samples]} if any(s.vision is not None for s in samples) else {}
        before = dict(self.scorer.stats)
        out = self.scorer.score([s.teacher_ctx for s in samples], [s.completion for s in samples], **extra)
        # recorded per step: whether the teacher reused cached prefix K/V (the constitution) or re-encoded
        self._prefix_stats = {k: self.scorer.stats[k] - before[k] for k in before}
        self._prefix_stats["reuse"] = float(self.scorer.prefix_reuse and not self.scorer._fell_back)
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
            if self.vision is not None:
                from copsd.vlm import hidden_states

                v = self._vision_kwargs(part)
                h = hidden_states(self.ref, ids, mask, v["vision"], v["context_lens"])
            else:
                h = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            h = gather_rows(h, [len(s.student_ctx) - 1 for s in part], [len(s.completion) for s in part])
            tgt = torch.tensor([t for s in part for t in s.completion], device=self.device)
            lp, _ = sampled_logprobs(h.to(head.weight.dtype), head.weight, tgt, temperature=self.cfg.temperature,
                                     logit_scale=scale, softcap=softcap, backend=self.cfg.backend)
            out.append(lp.float())
        return torch.cat(out)

    @torch.no_grad()
    def _policy_logprobs(self, samples) -> torch.Tensor:
        """pi_old recomputed: the student's log-probs of its samples from the same forward as the update
        (``old_logprobs: recompute``), before the step's first optimizer step."""
        cfg, out = self.cfg, []
        for j in range(0, len(samples), cfg.per_device_train_batch_size):
            part = samples[j:j + cfg.per_device_train_batch_size]
            ids, mask = pad_right([s.student_ctx + s.completion for s in part], self.tokenizer.pad_token_id,
                                  self.device)
            with self.acc.autocast():
                hidden, weight = self.policy(ids, mask, **self._vision_kwargs(part))
            h = gather_rows(hidden, [len(s.student_ctx) - 1 for s in part], [len(s.completion) for s in part])
            tgt = torch.tensor([t for s in part for t in s.completion], device=self.device, dtype=torch.long)
            lp, _ = sampled_logprobs(h.to(weight.dtype), weight, tgt, temperature=cfg.temperature,
                                     logit_scale=self.s_scale, softcap=self.s_softcap, backend=cfg.backend)
            out.append(lp.float())
        return torch.cat(out) if out else torch.zeros(0, device=self.device)

    def _micro_normalizer(self, mb_normalizer: float, micro: list[int], lengths: list[int]) -> float:
        """The loss divisor of one micro-batch: the mini-batch's global token count (``global_token_mean``),
        or the micro-batch's own token count times the number of micro-batches summed into one optimizer step
        (``micro_batch_token_mean``: the mean of the micro-batches' token means, as the reference)."""
        if self.cfg.loss_aggregation == "global_token_mean":
            return mb_normalizer
        return max(float(sum(lengths[j] for j in micro)), 1.0) * self.cfg.gradient_accumulation_steps \
            * self.acc.num_processes

    def _hybrid_advantages(self, step, samples, rewards, group_all, lengths, sums):
        """Token advantages for the token rows, judge outcome advantages broadcast over the judged answers."""
        from copsd.hybrid import broadcast, log_malformed, outcome_advantages
        from copsd.judge import judge_query

        judged = [i for i, s in enumerate(samples) if self.reward_types[s.prompt] == "judge"]
        is_judge = torch.zeros(len(samples), dtype=torch.bool, device=self.device)
        is_judge[judged] = True
        judge_tok = broadcast(is_judge, lengths)
        adv = group_token_zscore(rewards, group_all, ~judge_tok)
        per_answer = torch.zeros(len(samples), device=self.device)
        if judged:
            rows = [self.rows[samples[i].prompt] for i in judged]
            scores = self.judge([self._constitution_text(r) for r in rows],
                                [judge_query(message_text(r.messages[-1]["content"]), len(r.images or ()))
                                 for r in rows],
                                [self.tokenizer.decode(samples[i].completion, skip_special_tokens=True)
                                 for i in judged], [r.reference for r in rows])
            log_malformed(step + 1, scores)
            per_answer[judged] = outcome_advantages(scores.rewards, [samples[i].group for i in judged],
                                                    device=self.device)
            valid = [r for r in scores.rewards if r is not None]
            sums.add("reward_judge", float(sum(valid)), float(len(valid)))
            sums.add("judge_malformed", float(scores.malformed), float(len(judged)))
            sums.add("judge_malformed_count", float(scores.malformed), 1.0 / self.acc.num_processes)
        adv = torch.where(judge_tok, broadcast(per_answer, lengths), adv)
        n_tok, n_judge_tok = float((~judge_tok).sum()), float(judge_tok.sum())
        sums.add("judge_fraction", float(len(judged)), float(len(samples)))
        sums.add("reward_token", float(rewards[~judge_tok].sum()), n_tok)
        sums.add("advantage_abs_token", float(adv[~judge_tok].abs().sum()), n_tok)
        sums.add("advantage_abs_judge", float(adv[judge_tok].abs().sum()), n_judge_tok)
        sums.add("completion_length_token", n_tok, float(len(samples) - len(judged)))
        sums.add("completion_length_judge", n_judge_tok, float(len(judged)))
        return adv

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
        # Divergence objectives without the k3 KL term read the teacher's sampled-token log-probs (for rewards and
        # advantages: metrics only) from the divergence op's own teacher logits during the update, where the op's
        # logit transform is the teacher's own; otherwise one more teacher lm_head pass computes them here.
        teacher_from_update = (_STATS_FROM_DIVERGENCE and cfg.objective in ("reverse_kl", "topk", "jsd")
                               and not cfg.kl_coef
                               and (self.t_scale, self.t_softcap) == (self.s_scale, self.s_softcap))
        if teacher_from_update:
            teacher_logp = torch.full((len(ids_all),), float("nan"), device=self.device)
        else:
            with torch.no_grad():
                teacher_logp, _ = sampled_logprobs(teacher_hidden.to(tw.dtype), tw, ids_all,
                                                   temperature=cfg.temperature, logit_scale=self.t_scale,
                                                   softcap=self.t_softcap, backend=cfg.backend)
                teacher_logp = teacher_logp.float()
        mask_all = torch.ones_like(ids_all, dtype=torch.bool)
        group_all = torch.tensor([s.group for s in samples for _ in s.completion], device=self.device)
        sums = Sums(self.device)

        def rewards_and_advantages():
            rewards = token_rewards(teacher_logp, rollout_logp, mask_all, cfg.reward_clip_low, cfg.reward_clip_high,
                                    cfg.reward_bonus)
            if cfg.objective == "hybrid":
                return rewards, self._hybrid_advantages(step, samples, rewards, group_all, lengths, sums)
            return rewards, group_token_zscore(rewards, group_all, mask_all)

        # the divergence objectives' losses do not read the advantages
        rewards, adv = (None, None) if teacher_from_update else rewards_and_advantages()
        ref_logp = self._ref_logprobs(samples) if cfg.kl_coef > 0 else None
        old_logp = rollout_logp
        if cfg.old_logprobs == "recompute" and cfg.objective in ("paper", "hybrid"):
            old_logp = self._policy_logprobs(samples)
            sums.add("old_logp_rollout_abs_diff", float((old_logp - rollout_logp).abs().sum()), float(len(ids_all)))
        t2 = time.perf_counter()

        params = PaperParams(cfg.reward_clip_low, cfg.reward_clip_high, cfg.reward_bonus, cfg.epsilon,
                             cfg.epsilon_high, cfg.dual_clip, cfg.kl_coef, kl_clamp=cfg.kl_clamp)
        per_mb = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        self.policy.train()
        for mb in range(cfg.num_mini_batches):
            mb_samples = list(range(mb * per_mb, (mb + 1) * per_mb))
            normalizer = self.global_token_count(sum(lengths[j] for j in mb_samples))
            gn = self.optimizer_step(
                functools.partial(self._micro_loss, samples, micro, offsets, ids_all, old_logp, adv, ref_logp,
                                  teacher_hidden, tw, self._micro_normalizer(normalizer, micro, lengths), params,
                                  sums, teacher_logp if teacher_from_update else None)
                for micro in micro_batches(mb_samples, cfg.per_device_train_batch_size))
            if cfg.max_grad_norm > 0:
                sums.add("grad_norm", gn / acc.num_processes, 1.0 / acc.num_processes)
            if cfg.teacher_mode == "ema":
                self._ema_update()
        if teacher_from_update:
            if bool(teacher_logp.isnan().any()):
                raise RuntimeError("the update did not cover every sampled token (teacher log-probs missing)")
            rewards, adv = rewards_and_advantages()
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
        ps = self._prefix_stats
        inv = 1.0 / acc.num_processes
        sums.add("teacher_prefix_hits", ps["prefix_hits"], inv)      # summed over processes
        sums.add("teacher_prefix_misses", ps["prefix_misses"], inv)
        sums.add("teacher_prefix_reuse", ps["reuse"], 1.0)           # fraction of processes reusing
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

    def _micro_loss(self, samples, micro, offsets, ids_all, old_logp, adv, ref_logp, teacher_hidden, tw,
                    normalizer, params, sums, teacher_logp_out=None):
        """One micro-batch's loss; ``teacher_logp_out``: a [tokens] tensor the divergence objectives fill with the
        teacher's log-probs of the micro-batch's sampled tokens (from the divergence op's statistics)."""
        cfg = self.cfg
        part = [samples[j] for j in micro]
        ids, mask = pad_right([s.student_ctx + s.completion for s in part], self.tokenizer.pad_token_id,
                              self.device)
        with self.acc.autocast():
            hidden, weight = self.policy(ids, mask, **self._vision_kwargs(part))
        h = gather_rows(hidden, [len(s.student_ctx) - 1 for s in part], [len(s.completion) for s in part])
        h = h.to(weight.dtype)
        sel = torch.cat([torch.arange(offsets[j], offsets[j + 1], device=self.device) for j in micro])
        tgt = ids_all[sel]
        tmask = torch.ones_like(tgt, dtype=torch.bool)
        ref = ref_logp[sel] if ref_logp is not None else None
        lkw = dict(temperature=cfg.temperature, logit_scale=self.s_scale, softcap=self.s_softcap, backend=cfg.backend)
        if cfg.objective in ("paper", "hybrid"):
            # the per-token loss goes into the fused op: its gradient is taken in the forward pass
            loss, stats, logp, ent = fused_paper_loss(h, weight, tgt, old_logp[sel], adv[sel], tmask, normalizer,
                                                      ref_logp=ref, params=params, **lkw)
            sums.add("pg_loss", float(stats["pg_loss_sum"]), float(len(tgt)))
            sums.add("clip_fraction", float(stats["clip_sum"]), float(len(tgt)))
            sums.add("dual_clip_fraction", float(stats["dual_clip_sum"]), float(len(tgt)))
        else:
            th = teacher_hidden[sel].to(tw.dtype)
            # the metrics' log-probs and entropy come from the divergence's own logits, unless the k3 KL term
            # needs the student's log-probs with their gradient
            from_op = _STATS_FROM_DIVERGENCE and not cfg.kl_coef
            logp = ent = None
            if not from_op:
                logp, ent = sampled_logprobs(h, weight, tgt, entropy=True, **lkw)
            loss, stats = divergence_loss(cfg.objective, h, weight, th, tw, tmask, normalizer, logp=logp,
                                          ref_logp=ref, kl_coef=cfg.kl_coef, kl_clamp=cfg.kl_clamp, beta=cfg.beta,
                                          topk=cfg.topk, stats_ids=tgt if from_op else None,
                                          temperature=cfg.temperature, logit_scale=self.s_scale,
                                          softcap=self.s_softcap, backend=cfg.backend)
            if from_op:
                token_stats = stats["token_stats"]
                logp, ent = token_stats.student_logprobs, token_stats.student_entropy
                if teacher_logp_out is not None:
                    teacher_logp_out[sel] = token_stats.teacher_logprobs.float()
            sums.add("divergence", float(stats["divergence_sum"]), float(len(tgt)))
        if "kl_sum" in stats:
            sums.add("kl", float(stats["kl_sum"]), float(len(tgt)))
        # loss is (token sum / global step tokens): summed over micro-batches and processes it is the token-mean
        k = cfg.num_mini_batches
        sums.add("loss", float(loss.detach()) / k, 1.0 / (k * cfg.gradient_accumulation_steps * self.acc.num_processes))
        sums.add("entropy", float(ent.detach().sum()), float(len(tgt)))
        with torch.no_grad():
            sums.add("ratio", float(torch.exp(logp.detach() - old_logp[sel]).sum()), float(len(tgt)))
        return loss

    @torch.no_grad()
    def _ema_update(self):
        d = self.cfg.ema_decay
        for pe, p in zip(self.ema.parameters(), self.model.parameters()):
            if p.requires_grad:
                pe.mul_(d).add_(fsdp.full_tensor(p.detach()).to(pe.dtype), alpha=1 - d)

    def _text_metrics(self, samples, sums):
        from copsd.textmetrics import leak_rate, self_bleu

        tok = self.tokenizer
        texts = [tok.decode(s.completion, skip_special_tokens=True) for s in samples]
        prompts = [message_text(self.rows[s.prompt].messages[-1]["content"]) for s in samples]
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
            prompt = message_text(self.rows[s.prompt].messages[-1]["content"])
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

    def checkpoint_state(self) -> dict:
        from accelerate.utils import gather_object

        return {"global_step": self.step, "optimizer_steps": self.step * self.cfg.num_mini_batches,
                "max_steps": self.max_steps, "prompts_consumed": self.step * self.prompts_per_step,
                "num_rows": len(self.rows), "prompts_per_step": self.prompts_per_step,
                "num_processes": self.acc.num_processes, "constitution_sha256": self.constitution.sha256,
                "initial_metrics": self.initial, **self.card_extra(),
                # every process's teacher prefix cache (each scored its own prompts), one entry per process:
                # restored on resume, since the cache decides how the teacher's hidden states are split and so
                # their rounding (TeacherScorer.cache_state)
                "teacher_prefix_cache": gather_object([self.scorer.cache_state()])}

    def card_extra(self) -> dict:
        if self.cfg.teacher_mode != "checkpoint":
            return {"teacher": f"{self.cfg.teacher_mode} (the student itself)"}
        path = self.cfg.teacher_model_name_or_path
        return {"teacher": os.path.abspath(path) if os.path.isdir(path) else path,
                "teacher constitution sha256": self.teacher_constitution or "unknown (no constitution.json)"}

    def extra_tensors(self):
        return {"ema_teacher": dict(self.ema.state_dict())} if self.cfg.teacher_mode == "ema" else None

    def check_resume(self, ckpt: str, state: dict):
        if state.get("constitution_sha256") != self.constitution.sha256:
            raise ValueError(f"resume_from_checkpoint: {ckpt} was trained with constitution "
                             f"{state.get('constitution_sha256')}, but {self.cfg.constitution} hashes to "
                             f"{self.constitution.sha256}")
        if (state.get("num_rows"), state.get("prompts_per_step")) != (len(self.rows), self.prompts_per_step):
            raise ValueError(f"resume_from_checkpoint: {ckpt} was written with {state.get('num_rows')} rows and "
                             f"{state.get('prompts_per_step')} prompts per step; now {len(self.rows)} and "
                             f"{self.prompts_per_step}: the data position cannot be restored")

    def restore_extra(self, ckpt: str, state: dict):
        if self.cfg.teacher_mode == "ema":
            self.ema.load_state_dict(load_extra(ckpt, "ema_teacher"))
        self.initial = state.get("initial_metrics") or {}
        caches = state.get("teacher_prefix_cache") or []
        if len(caches) == self.acc.num_processes:  # else another split of the prompts: nothing to continue
            self.scorer.load_cache_state(caches[self.acc.process_index])

    # ------------------------------------------------------------------ loop hooks

    def end_of_step(self, m: dict) -> bool:
        alarms = self._alarms(m)
        m["alarms"] = len(alarms)
        for a in alarms:
            logger.warning("copsd collapse alarm at step %d: %s", self.step, a)
        if alarms and self.cfg.stop_on_collapse:
            logger.warning("stop_on_collapse: stopping at step %d", self.step)
            return True
        return False

    def progress_postfix(self, m: dict) -> dict:
        return {"loss": f"{m['loss']:.4f}", "len": f"{m['completion_length']:.0f}", "ent": f"{m['entropy']:.2f}"}


def _context_of(path: str, trust_remote_code: bool) -> int | None:
    from transformers import AutoConfig

    return _hf.max_context(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))


def _teacher_provenance(teacher_path: str, constitution) -> str | None:
    """The constitution hash a Stage-1 teacher recorded (``constitution.json``); a loud warning if it is not the
    one distillation uses."""
    path = os.path.join(teacher_path, "constitution.json") if os.path.isdir(teacher_path) else ""
    if not os.path.isfile(path):
        logger.warning("teacher %s records no constitution (no constitution.json): cannot check that it was "
                       "trained with the constitution given here", teacher_path)
        return None
    with open(path, encoding="utf-8") as f:
        recorded = json.load(f).get("sha256")
    if recorded != constitution.sha256:
        bar = "!" * 78
        logger.warning("\n%s\nCONSTITUTION MISMATCH: the teacher %s was trained with constitution %s, but this "
                       "distillation puts %s (%s) in its user turn. The teacher will see principles it was not "
                       "trained on; use the Stage-1 constitution unless this is intended.\n%s", bar, teacher_path,
                       recorded, constitution.sha256, constitution.path, bar)
    return recorded


def distill(cfg: DistillConfig, **kwargs) -> dict:
    """Run Stage 2 and return the last step's metrics."""
    return Distiller(cfg, **kwargs).train()


__all__ = ["Distiller", "distill", "list_checkpoints"]
