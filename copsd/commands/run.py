"""``copsd run``: Stage 1, Stage 2 and an evaluation in one command.

Top-level YAML keys / flags go to both stages; ``sft:`` / ``distill:`` sections and ``--sft.<key>`` /
``--distill.<key>`` flags to one.  Outputs: ``output_dir/teacher``, ``output_dir/student`` and
``output_dir/eval`` (base model vs teacher vs student on ``eval.prompt_files``).
"""

NAME = "run"
HELP = "both stages (sft-teacher, distill) and an evaluation in one command"


def add_arguments(parser):
    from copsd.config import add_run_arguments

    add_run_arguments(parser)
    parser.add_argument("--skip_eval", action="store_true", help="stop after Stage 2")


def run(args):
    import os

    from copsd.commands._common import setup_logging
    from copsd.config import run_config_from_args
    from copsd.distill import distill
    from copsd.sft import sft_teacher

    rc = run_config_from_args(args)
    from copsd.training import check_output_dir

    for stage in (rc.sft, rc.distill):  # refuse a reused directory before Stage 1 starts, not after it
        check_output_dir(stage)
    setup_logging()
    sft_teacher(rc.sft)
    distill(rc.distill)
    if args.skip_eval or not rc.eval_prompt_files:
        print(f"copsd run: teacher in {rc.sft.output_dir}, student in {rc.distill.output_dir}")
        return 0
    # Under a launcher (DDP / FSDP2) the evaluation runs once, in the main process: the processes meet, the
    # group is closed, the others end here (cli.main then exits every launched process without teardown).
    from copsd.cli import _close_process_group

    if _close_process_group():
        args._distributed_ended = True
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
    try:
        from copsd.eval import evaluate_models
    except ImportError as e:
        raise ValueError(f"copsd run: the evaluation module is unavailable ({e}); use --skip_eval") from None
    out = os.path.join(os.path.dirname(rc.distill.output_dir.rstrip("/")), "eval")
    models = [{"name": "base", "path": rc.sft.model_name_or_path},
              {"name": "teacher", "path": rc.sft.output_dir, "constitution": rc.sft.constitution},
              {"name": "student", "path": rc.distill.output_dir}]
    evaluate_models(models, rc.eval_prompt_files, out, max_new_tokens=rc.eval_max_new_tokens,
                    seed=rc.distill.seed, teacher_template=rc.sft.teacher_template,
                    leak_constitutions=[rc.distill.constitution], progress=not rc.distill.disable_tqdm)
    # evaluate_models printed the table; the whole report is in report.json (no JSON dump here)
    print(f"copsd run: teacher in {rc.sft.output_dir}, student in {rc.distill.output_dir}, evaluation in {out} "
          f"(report: {os.path.join(out, 'report.json')})")
    return 0
