"""``copsd sft-teacher``: Stage 1, Cross-SFT of the teacher with the constitution in context."""

NAME = "sft-teacher"
HELP = "Stage 1: build the Cross-SFT set and fine-tune the teacher with the constitution in context"


def add_arguments(parser):
    from copsd.config import SFTTeacherConfig, add_config_arguments

    add_config_arguments(parser, SFTTeacherConfig)


def run(args):
    from copsd.commands._common import run_stage
    from copsd.config import SFTTeacherConfig
    from copsd.sft import sft_teacher

    return run_stage(args, SFTTeacherConfig, sft_teacher, "sft-teacher", "final loss")
