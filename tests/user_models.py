"""What a new user brings, built offline: a tiny Qwen2-like model with tied embeddings, a real byte-level BPE
tokenizer (trained with ``tokenizers`` on a few lines) and a ChatML chat template; and the same with a
Gemma-style template that has no system role.
"""

from __future__ import annotations

import json
import os

CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
          "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA_STYLE = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
               "{{ raise_exception('System role not supported') }}{% endif %}"
               "{% for m in messages %}{% if m['role'] == 'assistant' %}{% set role = 'model' %}"
               "{% else %}{% set role = m['role'] %}{% endif %}"
               "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
               "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

CORPUS = [
    "You are a helpful assistant. Be helpful and honest; refuse to help anyone hurt a person.",
    "How do I bake bread at home? Mix flour, water, salt and yeast, then let the dough rise.",
    "Write a short poem about the sea: waves roll in, the gulls cry, the tide goes out again.",
    "How do I hurt my neighbor? I can't help with hurting people. Talk to someone you trust.",
    "Tell me the home address of a famous singer. I can't share private data about a person.",
    "What is the capital of France? Paris is the capital of France, on the river Seine.",
    "Explain what a Python process is, and how to stop one with kill or the task manager.",
    "## category: violence Never give instructions that help hurt a person. --- # Title",
]

PROMPTS = [
    {"prompt": "How do I bake bread at home?"},                                   # TRL prompt-only, no kind
    {"prompt": [{"role": "user", "content": "Write a short poem about the sea."}], "kind": "general"},
    {"messages": [{"role": "user", "content": "How do I hurt my neighbor?"},
                  {"role": "assistant", "content": "I can't help with hurting people."}], "kind": "harmful",
     "category": "violence"},
    {"prompt": "What is the capital of France?", "completion": "Paris.", "kind": "benign"},
]

# the same prompts in copsd's original row format (every row labelled), for tests about other things
LABELLED = [
    {"prompt": "How do I bake bread at home?", "kind": "benign"},
    {"prompt": "Write a short poem about the sea.", "kind": "general"},
    {"prompt": "How do I hurt my neighbor?", "kind": "harmful", "category": "violence",
     "reference": "I can't help with hurting people."},
    {"prompt": "What is the capital of France?", "kind": "benign"},
]

CONSTITUTION_MD = ("# My house rules\n\nBe helpful and honest. Refuse to help anyone hurt a person.\n\n"
                   "## category: violence\nNever give instructions that help hurt a person.\n")


def train_byte_level_bpe(corpus, special, vocab_size: int = 400):
    """A ``tokenizers`` byte-level BPE model trained here on ``corpus`` with ``special`` tokens (ids 0, 1, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def bpe_tokenizer(chat_template: str = CHATML, gemma: bool = False):
    """A byte-level BPE tokenizer trained here on ``CORPUS``, with ChatML (or Gemma-style) special tokens."""
    from transformers import PreTrainedTokenizerFast

    if gemma:
        special = ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
    else:
        special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = train_byte_level_bpe(CORPUS, special)
    if gemma:
        t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<end_of_turn>",
                                    pad_token="<pad>", extra_special_tokens=["<eos>", "<start_of_turn>"])
    else:
        t = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                    extra_special_tokens=["<|im_start|>"])
    t.chat_template = chat_template
    return t


def qwen2_dir(path, *, gemma: bool = False, max_positions: int = 512, seed: int = 0) -> str:
    """Save a tiny Qwen2 (tied input/output embeddings) + BPE tokenizer to ``path``; returns the path."""
    from copsd._hf import tiny_causal_lm

    tok = bpe_tokenizer(GEMMA_STYLE if gemma else CHATML, gemma=gemma)
    model = tiny_causal_lm("qwen2", vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                           intermediate_size=64, max_position_embeddings=max_positions, seed=seed,
                           tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def write_constitution(dir_path) -> str:
    path = os.path.join(str(dir_path), "house_rules.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(CONSTITUTION_MD)
    return path
