"""The toy base model: a tiny Llama pretrained on CPU from a seed and cached.

``load_or_pretrain()`` returns a directory holding a ``save_pretrained`` model (safetensors),
its tokenizer with a chat template, the toy constitution (``constitution.md``) and the prompt
sets (``prompts/train.jsonl``, ``prompts/heldout.jsonl``).  The directory name is a hash of
everything that determines its content (world version, behaviour, sizes, seed), so changing
any of them pretrains a new model instead of reusing a stale one.  It is written to a temporary
directory and renamed into place, so an interrupted run never leaves a half-written cache.

Cache location: the ``cache_dir`` argument, else ``$COPSD_CACHE_DIR/toy``, else
``$XDG_CACHE_HOME/copsd/toy`` (``~/.cache/copsd/toy``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

from copsd.toy import world
from copsd.toy.tokenizer import train_tokenizer

# Bump when the pretraining code changes what it produces (the cache key includes it).
RECIPE_VERSION = "2"


@dataclass(frozen=True)
class ToyConfig:
    seed: int = 0
    # corpus and prompt sets
    n_conversations: int = 12000
    n_train_prompts: int = 360
    n_heldout_prompts: int = 240
    behaviour: world.Behaviour = field(default_factory=world.Behaviour)
    # model (Llama family)
    hidden_size: int = 96
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 256
    # pretraining
    steps: int = 1000
    batch_size: int = 32
    length_group: int = 16  # batches drawn together and grouped by length (less padding)
    learning_rate: float = 3e-3
    warmup_steps: int = 40
    weight_decay: float = 0.01
    # Intra-op threads while pretraining.  The matrices are tiny, so threads mostly add
    # synchronisation; on a busy 2-core machine 2 threads were 8x slower per step than 1.
    num_threads: int = 1

    def key(self) -> str:
        """Hash of everything that determines the pretrained model: the world (word lists, templates),
        the recipe version, this whole config (seed included) and the torch version (another torch can
        round differently and train different weights)."""
        import torch

        blob = json.dumps({"world": world.fingerprint(), "recipe": RECIPE_VERSION, "torch": torch.__version__,
                           "config": dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def validate(self) -> ToyConfig:
        for name in ("n_conversations", "n_train_prompts", "n_heldout_prompts", "hidden_size", "num_layers",
                     "length_group", "num_threads",
                     "num_heads", "num_kv_heads", "intermediate_size", "steps", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"ToyConfig.{name}: expected a positive int, got {v!r}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("ToyConfig.hidden_size/num_heads/num_kv_heads: expected hidden_size divisible by "
                             "num_heads and num_heads divisible by num_kv_heads")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"ToyConfig.learning_rate: expected a positive number, got {self.learning_rate!r}")
        return self


def cache_root(cache_dir: str | None = None) -> str:
    if cache_dir:
        return os.path.abspath(os.path.expanduser(cache_dir))
    env = os.environ.get("COPSD_CACHE_DIR")
    if env:
        return os.path.join(os.path.abspath(os.path.expanduser(env)), "toy")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "copsd", "toy")


def _encode_corpus(tokenizer, corpus, max_len):
    """Token ids and the assistant-token mask (loss on the answer and its end token only)."""
    rows = []
    for conv in corpus:
        prompt = tokenizer.apply_chat_template(conv["messages"][:1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(conv["messages"], tokenize=False)
        p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        ids = tokenizer(full, add_special_tokens=False).input_ids
        if ids[: len(p_ids)] != p_ids:
            raise RuntimeError("toy chat template is not prefix-consistent")  # a bug in this module
        if len(ids) > max_len:
            raise ValueError(f"ToyConfig.max_position_embeddings: a conversation has {len(ids)} tokens, "
                             f"more than {max_len}")
        rows.append((ids, len(p_ids)))
    return rows


def _batch(rows, idx, pad_id):
    import torch

    width = max(len(rows[i][0]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), width), -100, dtype=torch.long)
    attn = torch.zeros((len(idx), width), dtype=torch.long)
    for r, i in enumerate(idx):
        seq, n_prompt = rows[i]
        ids[r, : len(seq)] = torch.tensor(seq)
        attn[r, : len(seq)] = 1
        labels[r, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])
    return ids, attn, labels


def _length_grouped_batches(rows, batch_size, group, gen):
    """One epoch of batches: a random permutation, cut into groups of ``group`` batches, each
    group sorted by length and cut into batches; batch order shuffled.  Deterministic in ``gen``."""
    import torch

    perm = torch.randperm(len(rows), generator=gen).tolist()
    batches = []
    span = batch_size * group
    for a in range(0, len(perm) - batch_size + 1, span):
        chunk = sorted(perm[a : a + span], key=lambda i: len(rows[i][0]))
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk) - batch_size + 1, batch_size)]
    shuffle = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in shuffle]


def pretrain(config: ToyConfig, out_dir: str, *, progress: bool = True) -> dict:
    """Generate the corpus, train the tokenizer and the model, and save everything to ``out_dir``."""
    config.validate()
    with torch_threads(config.num_threads):
        return _pretrain(config, out_dir, progress)


class torch_threads:
    """Context manager: run with ``n`` torch intra-op threads, then restore the previous count."""

    def __init__(self, n: int | None):
        self.n = n

    def __enter__(self):
        import torch

        self.prev = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.prev)
        return False


def _pretrain(config: ToyConfig, out_dir: str, progress: bool) -> dict:
    import torch
    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    from copsd.data import write_jsonl

    t0 = time.time()
    corpus = world.pretraining_corpus(config.n_conversations, config.seed, config.behaviour)
    sets = world.prompt_sets(config.seed, n_train=config.n_train_prompts, n_heldout=config.n_heldout_prompts)
    texts = [m["content"] for c in corpus for m in c["messages"]]
    texts += [r["prompt"] for rows in sets.values() for r in rows] + [world.CONSTITUTION_TEXT]
    tokenizer = train_tokenizer(texts)
    rows = _encode_corpus(tokenizer, corpus, config.max_position_embeddings)

    mconf = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, rope_theta=10000.0,
    )
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(mconf)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.learning_rate,
                            betas=(0.9, 0.98))

    def lr_at(step):  # linear warmup, cosine decay to 10%
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        frac = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(config.seed)
    order: list[list[int]] = []
    losses = []
    bar = tqdm(range(config.steps), desc="pretrain toy base", disable=not progress, unit="step")
    for step in bar:
        if not order:
            order = _length_grouped_batches(rows, config.batch_size, config.length_group, gen)
        idx = order.pop()
        ids, attn, labels = _batch(rows, idx, tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == config.steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()

    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "constitution.md"), "w", encoding="utf-8") as f:
        f.write(world.CONSTITUTION_TEXT + "\n")
    os.makedirs(os.path.join(out_dir, "prompts"), exist_ok=True)
    for name, prompt_rows in sets.items():
        write_jsonl(os.path.join(out_dir, "prompts", f"{name}.jsonl"), prompt_rows)
    info = {
        "world_version": world.WORLD_VERSION, "world_fingerprint": world.fingerprint(),
        "recipe_version": RECIPE_VERSION, "key": config.key(), "config": dataclasses.asdict(config),
        "n_parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
        "final_loss": sum(losses[-20:]) / len(losses[-20:]), "first_loss": losses[0],
        "pretrain_seconds": round(time.time() - t0, 1), "torch_threads": torch.get_num_threads(),
    }
    with open(os.path.join(out_dir, "toy_world.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info


@dataclass(frozen=True)
class ToyBase:
    path: str
    constitution: str
    train_prompts: str
    heldout_prompts: str
    info: dict
    cached: bool


def _paths(path, cached) -> ToyBase:
    with open(os.path.join(path, "toy_world.json")) as f:
        info = json.load(f)
    return ToyBase(path=path, constitution=os.path.join(path, "constitution.md"),
                   train_prompts=os.path.join(path, "prompts", "train.jsonl"),
                   heldout_prompts=os.path.join(path, "prompts", "heldout.jsonl"), info=info, cached=cached)


def load_or_pretrain(config: ToyConfig | None = None, *, cache_dir: str | None = None,
                     progress: bool = True, force: bool = False) -> ToyBase:
    """The cached toy base for ``config``, pretraining it first if it is not there (or ``force``)."""
    config = (config or ToyConfig()).validate()
    root = cache_root(cache_dir)
    final = os.path.join(root, f"base-{config.key()}")
    if not force and os.path.isfile(os.path.join(final, "toy_world.json")):
        return _paths(final, cached=True)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-base-", dir=root)
    try:
        pretrain(config, tmp, progress=progress)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return _paths(final, cached=False)
