"""A word-level tokenizer for the toy language, trained offline with the ``tokenizers`` library.

The toy language separates every word and punctuation mark by a space, so a word-level model
is exact: every response renders to the same token ids after any prompt (the teacher/student
view-consistency check of :mod:`copsd.constitution` holds by construction).  Words are ordered
by frequency, ties broken alphabetically, so the vocabulary is the same on every run.
"""

from __future__ import annotations

from collections import Counter

PAD, UNK, END = "<|pad|>", "<|unk|>", "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, UNK, END, *ROLE_TOKENS)

# Every turn is "<|role|> content <|end|>"; the generation prompt is the assistant header.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' <|end|> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def train_tokenizer(texts, *, pad_to_multiple_of: int = 8):
    """Train a word-level tokenizer on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    The vocabulary is the special tokens, then the words of ``texts`` by descending count
    (alphabetical among equal counts); it is padded with ``<|unused_i|>`` entries to a multiple
    of ``pad_to_multiple_of`` so the embedding matrix has a friendly shape.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts: expected a non-empty list of strings")
    # The trainer counts words; feed them pre-sorted so equal counts cannot reorder between runs.
    counts = Counter(w for t in texts for w in t.split())
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(vocab_size=len(ordered) + len(SPECIAL_TOKENS) + 1, min_frequency=1,
                                        special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator((" ".join([w] * c) for w, c in ordered), trainer=trainer)
    vocab = tok.get_vocab()
    # the trainer orders by count but leaves ties to a hash map; re-impose the deterministic order
    words = [w for w, _ in ordered if w in vocab and w not in SPECIAL_TOKENS]
    order = list(SPECIAL_TOKENS) + words
    pad = (-len(order)) % pad_to_multiple_of
    order += [f"<|unused_{i}|>" for i in range(pad)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(order)}, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, eos_token=END,
        additional_special_tokens=list(ROLE_TOKENS), model_max_length=512, padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
