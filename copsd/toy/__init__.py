"""The bundled toy world: a synthetic chat language, its constitution, prompt sets, a word-level
tokenizer and a tiny Llama pretrained on CPU from a seed (cached, no downloads).

It simulates the mechanism behind safety-OPSD collapse (see ``docs/toy_world.md``); it is not
evidence about real models.
"""

from copsd.toy.model import ToyBase, ToyConfig, cache_root, load_or_pretrain, pretrain
from copsd.toy.tokenizer import CHAT_TEMPLATE, train_tokenizer
from copsd.toy.world import CONSTITUTION_TEXT, Behaviour, prompt_sets

__all__ = ["ToyBase", "ToyConfig", "cache_root", "load_or_pretrain", "pretrain", "CHAT_TEMPLATE",
           "train_tokenizer", "CONSTITUTION_TEXT", "Behaviour", "prompt_sets"]
