"""One on-policy distillation step end to end on CPU: copsd's ``Distiller`` against TRL's ``GKDTrainer`` (fully
on-policy, ``lmbda=1``) and ``DistillationTrainer``, on the same tiny model pair, prompts, completions per prompt
(G) and new tokens.

Every trainer gets the same student (a tiny Qwen2 with tied embeddings and a byte-level BPE tokenizer with a
ChatML template, built here offline), the same teacher (same architecture, another seed), P prompts per step each
sampled G times (TRL's trainers sample once per row, so their batch holds each prompt G times), T new tokens
(no early end: ``min_new_tokens = T`` where the trainer takes it), the generalised JSD with beta = 0.5, AdamW at
the same learning rate, one optimizer step per step (copsd: ``num_mini_batches=1``, whose default of 4 would
make four updates per rollout batch), no gradient checkpointing.  Each trainer runs ``--warmup`` steps that are
not timed, then ``--steps`` timed steps; the table reports the median seconds per step and, for copsd, the split
its trainer records (generation, teacher scoring, update).  TRL is optional (``pip install trl``): without it
those rows are skipped with a message.

Run: ``python benchmarks/bench_e2e_cpu.py [--prompts 4 --g 4 --new-tokens 32 --hidden 128 --layers 2
--steps 3 --warmup 1] [--only copsd|gkd|distillation]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the offline BPE tokenizer of the user-flow tests

import common  # noqa: E402

PROMPTS = [
    "How do I bake bread at home?", "Write a short poem about the sea.", "What is the capital of France?",
    "Explain what a Python process is.", "Give me three tips for a job interview.", "How do plants make food?",
    "Summarise the rules of chess in two lines.", "Why is the sky blue?",
]
LR = 1e-4
BETA = 0.5


def build_models(root, hidden, layers):
    """Student and teacher directories (tiny Qwen2, tied embeddings, BPE tokenizer with a chat template)."""
    from user_models import bpe_tokenizer

    from copsd._hf import tiny_causal_lm

    tok = bpe_tokenizer()
    paths = {}
    for name, seed in (("student", 0), ("teacher", 1)):
        model = tiny_causal_lm("qwen2", vocab_size=len(tok), hidden_size=hidden, num_layers=layers,
                               num_heads=max(2, hidden // 32), num_kv_heads=max(1, hidden // 64),
                               intermediate_size=2 * hidden, max_position_embeddings=1024, seed=seed,
                               tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        path = os.path.join(root, name)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths[name] = path
    return paths


def _prompts(n):
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def run_copsd(paths, root, a):
    from copsd.config import DistillConfig
    from copsd.distill import Distiller

    data = os.path.join(root, "copsd_prompts.jsonl")
    with open(data, "w") as f:
        for p in _prompts(a.prompts):
            f.write(json.dumps({"prompt": p, "kind": "benign"}) + "\n")
    constitution = os.path.join(root, "rules.md")
    with open(constitution, "w") as f:
        f.write("# Rules\n\nBe helpful and honest.\n")
    cfg = DistillConfig(model_name_or_path=paths["student"], teacher_mode="checkpoint",
                        teacher_model_name_or_path=paths["teacher"], output_dir=os.path.join(root, "copsd_out"),
                        constitution=constitution, dataset=data, objective="jsd", beta=BETA,
                        num_generations=a.g, per_device_train_batch_size=a.prompts * a.g, num_mini_batches=1,
                        gradient_accumulation_steps=1, gradient_checkpointing=False,
                        max_completion_length=a.new_tokens, max_steps=a.warmup + a.steps, learning_rate=LR,
                        report_to=[], disable_tqdm=True, sample_every_steps=0, backend="cpu")
    trainer = Distiller(cfg)
    trainer.prepare()
    steps, split = [], []
    for step in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        m = trainer.train_step(step)
        dt = time.perf_counter() - t0
        if step >= a.warmup:
            steps.append(dt)
            split.append((m["time_rollout"], m["time_teacher"], m["time_update"]))
    med = [statistics.median(s[i] for s in split) for i in range(3)]
    return statistics.median(steps), steps, med


class _StepTimer:
    """A transformers TrainerCallback recording each optimizer step's wall time."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                timer.times.append(time.perf_counter() - timer.t0)

        self.times, self.t0, self.callback = [], 0.0, CB()


def _trl_common(a, root, name):
    return dict(output_dir=os.path.join(root, name), max_steps=a.warmup + a.steps, learning_rate=LR,
                per_device_train_batch_size=a.prompts * a.g, gradient_accumulation_steps=1, report_to=[],
                save_strategy="no", logging_steps=10_000, disable_tqdm=True, use_cpu=True, bf16=False,
                gradient_checkpointing=False,
                temperature=1.0, beta=BETA, seed=0)


def run_gkd(paths, root, a):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    tok = AutoTokenizer.from_pretrained(paths["student"])
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "ok"}]}
            for p in _prompts(a.prompts) for _ in range(a.g)]
    args = GKDConfig(**_trl_common(a, root, "gkd_out"), lmbda=1.0, max_new_tokens=a.new_tokens, seq_kd=False)
    timer = _StepTimer()
    trainer = GKDTrainer(model=AutoModelForCausalLM.from_pretrained(paths["student"]),
                         teacher_model=AutoModelForCausalLM.from_pretrained(paths["teacher"]), args=args,
                         train_dataset=Dataset.from_list(rows * (a.warmup + a.steps)), processing_class=tok,
                         callbacks=[timer.callback])
    trainer.generation_config.min_new_tokens = a.new_tokens
    trainer.train()
    t = timer.times[a.warmup:]
    return statistics.median(t), t, None


def run_distillation(paths, root, a):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    tok = AutoTokenizer.from_pretrained(paths["student"])
    rows = [{"prompt": [{"role": "user", "content": p}]} for p in _prompts(a.prompts) for _ in range(a.g)]
    args = DistillationConfig(**_trl_common(a, root, "distill_out"), max_completion_length=a.new_tokens,
                              generation_kwargs={"min_new_tokens": a.new_tokens})
    timer = _StepTimer()
    trainer = DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(paths["student"]),
                                  teacher_model=AutoModelForCausalLM.from_pretrained(paths["teacher"]), args=args,
                                  train_dataset=Dataset.from_list(rows * (a.warmup + a.steps)),
                                  processing_class=tok, callbacks=[timer.callback])
    trainer.train()
    t = timer.times[a.warmup:]
    return statistics.median(t), t, None


RUNNERS = {"copsd": run_copsd, "gkd": run_gkd, "distillation": run_distillation}
LABELS = {"copsd": "copsd Distiller (backend cpu)", "gkd": "TRL GKDTrainer (lmbda=1)",
          "distillation": "TRL DistillationTrainer"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--g", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--only", action="append", choices=list(RUNNERS))
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    results = {}
    with tempfile.TemporaryDirectory() as root:
        paths = build_models(root, a.hidden, a.layers)
        for name in a.only or list(RUNNERS):
            try:
                results[name] = RUNNERS[name](paths, root, a)
            except ImportError as e:
                print(f"{name}: skipped -- {e}", flush=True)
                continue
            med, ts, split = results[name]
            extra = "" if split is None else (f" (generation {split[0]:.2f} s, teacher {split[1]:.2f} s, "
                                              f"update {split[2]:.2f} s)")
            print(f"{name}: {med:.2f} s/step, steps {[round(t, 2) for t in ts]}{extra}", flush=True)
    print()
    print(f"P={a.prompts} prompts x G={a.g}, {a.new_tokens} new tokens, tiny Qwen2 hidden {a.hidden}, "
          f"{a.layers} layers; {a.steps} timed steps after {a.warmup} warm-up")
    print(f"Machine: {common.machine()}")
    print()
    print("| trainer | s/step (median) | generation | teacher | update | copsd speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    base = results.get("copsd", (None,))[0]
    for name, (med, _, split) in results.items():
        sp = ["", "", ""] if split is None else [f"{x:.2f}" for x in split]
        ratio = "" if base is None or name == "copsd" else f"{med / base:.2f}x"
        print(f"| {LABELS[name]} | {med:.2f} | {sp[0]} | {sp[1]} | {sp[2]} | {ratio} |")


if __name__ == "__main__":
    main()
