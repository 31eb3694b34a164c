"""``copsd distill``: Stage 2, constitution-conditioned on-policy distillation of the student."""

NAME = "distill"
HELP = "Stage 2: on-policy distillation of the student from the constitution-conditioned teacher"


def add_arguments(parser):
    from copsd.config import DistillConfig, add_config_arguments

    add_config_arguments(parser, DistillConfig)


def run(args):
    from copsd.commands._common import is_main_process, setup_logging
    from copsd.config import DistillConfig, config_from_args
    from copsd.distill import distill

    cfg = config_from_args(DistillConfig, args)
    setup_logging()
    metrics = distill(cfg)
    if is_main_process():
        print(f"copsd distill: wrote {cfg.output_dir} (last loss {metrics.get('loss', float('nan')):.4f})")
    return 0

