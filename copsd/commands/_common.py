"""Helpers shared by the training subcommands (not a subcommand: the CLI skips ``_`` modules)."""

import logging
import os


def setup_logging():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "accelerate", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def is_main_process():
    """Rank 0 of a torchrun / accelerate launch (or a single process)."""
    return int(os.environ.get("RANK", "0")) == 0
