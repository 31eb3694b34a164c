"""``copsd distill``: Stage 2, constitution-conditioned on-policy distillation of the student."""

NAME = "distill"
HELP = "Stage 2: on-policy distillation of the student from the constitution-conditioned teacher"


def add_arguments(parser):
    from copsd.config import DistillConfig, add_config_arguments

    add_config_arguments(parser, DistillConfig)


def run(args):
    from copsd.commands._common import run_stage
    from copsd.config import DistillConfig
    from copsd.distill import distill

    return run_stage(args, DistillConfig, distill, "distill", "last loss")
