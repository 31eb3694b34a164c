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


def run_stage(args, config_cls, train, command, loss_label):
    """Build ``config_cls`` from the parsed arguments, run ``train(cfg)`` and report on the main process."""
    from copsd.config import config_from_args
    from copsd.training import check_output_dir

    cfg = config_from_args(config_cls, args)
    check_output_dir(cfg)  # a reused output_dir is refused before any model is loaded
    setup_logging()
    metrics = train(cfg)
    if is_main_process():
        print(f"copsd {command}: wrote {cfg.output_dir} ({loss_label} {metrics.get('loss', float('nan')):.4g})")
    return 0
