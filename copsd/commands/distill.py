"""``copsd distill``: Stage 2, constitution-conditioned on-policy distillation of the student."""

NAME = "distill"
HELP = "Stage 2: on-policy distillation of the student from the constitution-conditioned teacher"


def add_arguments(parser):
    from copsd.config import DistillConfig, add_config_arguments

    add_config_arguments(parser, DistillConfig)


def setup_logging():
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "accelerate", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(args):
    from copsd.config import DistillConfig, config_from_args
    from copsd.distill import distill

    cfg = config_from_args(DistillConfig, args)
    setup_logging()
    metrics = distill(cfg)
    if _is_main():
        print(f"copsd distill: wrote {cfg.output_dir} (last loss {metrics.get('loss', float('nan')):.4f})")
    return 0


def _is_main():
    import os

    return int(os.environ.get("RANK", "0")) == 0

