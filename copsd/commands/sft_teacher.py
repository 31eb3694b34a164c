"""``copsd sft-teacher``: Stage 1, Cross-SFT of the teacher with the constitution in context."""

NAME = "sft-teacher"
HELP = "Stage 1: build the Cross-SFT set and fine-tune the teacher with the constitution in context"


def add_arguments(parser):
    from copsd.config import SFTTeacherConfig, add_config_arguments

    add_config_arguments(parser, SFTTeacherConfig)


def run(args):
    from copsd.commands._common import is_main_process, setup_logging
    from copsd.config import SFTTeacherConfig, config_from_args
    from copsd.sft import sft_teacher

    cfg = config_from_args(SFTTeacherConfig, args)
    setup_logging()
    metrics = sft_teacher(cfg)
    if is_main_process():
        print(f"copsd sft-teacher: wrote {cfg.output_dir} (final loss {metrics.get('loss', float('nan')):.4f})")
    return 0

