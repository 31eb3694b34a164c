"""``copsd run``: Stage 1, Stage 2 and an evaluation in one command.

Top-level YAML keys / flags go to both stages; ``sft:`` / ``distill:`` sections and ``--sft.<key>`` /
``--distill.<key>`` flags to one; the ``eval:`` section (``--eval.<key>``) takes ``copsd eval``'s options
(``prompt_files``, ``greedy``, ``judge``, ``baseline``, ...; ``copsd.config.EvalConfig``).  Outputs:
``output_dir/teacher``, ``output_dir/student`` and ``output_dir/eval`` (base model vs teacher, in its teacher
view, vs student on ``eval.prompt_files``).  The evaluation's inputs (prompt files and their rows, the
categories the teacher view needs, the judge's directory, tokenizer and config) are checked before Stage 1 starts.
"""

NAME = "run"
HELP = "both stages (sft-teacher, distill) and an evaluation in one command"


def add_arguments(parser):
    from copsd.config import add_run_arguments

    add_run_arguments(parser)
    parser.add_argument("--skip_eval", action="store_true", help="stop after Stage 2")


def check_eval_inputs(rc) -> None:
    """Fail before any training on what would only fail in the evaluation: a missing or malformed prompt file,
    a row category the Stage-1 constitution does not define (the teacher view), a judge that is not a local chat
    model directory."""
    import os

    from copsd.constitution import load_constitution
    from copsd.data import load_prompt_rows

    ev = rc.eval
    problems = []
    constitution = load_constitution(rc.sft.constitution, category_mode=rc.sft.category_mode,
                                     include_title=rc.sft.constitution_title)
    for f in ev.prompt_files:
        if not os.path.isfile(f):
            problems.append(f"eval.prompt_files: file not found: {f}")
            continue
        for row in load_prompt_rows(f):
            problem = constitution.check_category(row.category) if not row.constitution else None
            if problem:
                problems.append(f"{row.where}: {problem} ({rc.sft.constitution}, the teacher's evaluation view)")
    if ev.judge is not None:
        from copsd.judge import check_judge_dir

        try:
            check_judge_dir(ev.judge)
        except ValueError as e:
            problems.append(f"eval.{e}")
    if problems:
        raise ValueError("copsd run: the evaluation would fail after training:\n  " + "\n  ".join(problems))


def eval_kwargs(rc) -> dict:
    """``copsd.eval.evaluate_models`` keyword arguments from a ``RunConfig``: the ``eval:`` section, the teacher
    view of Stage 1 (template, category mode, title), the distill stage's seed, refusal detector and bf16."""
    ev = rc.eval
    temperature, num_samples = ev.decoding()
    bf16 = rc.distill.bf16 if ev.bf16 is None else ev.bf16
    dtype = None
    if bf16:
        import torch

        dtype = torch.bfloat16
    return dict(num_samples=num_samples, max_new_tokens=ev.max_new_tokens, temperature=temperature,
                top_p=ev.top_p, top_k=ev.top_k, batch_size=ev.batch_size, seed=rc.distill.seed,
                refusal_detector=ev.refusal_detector or rc.distill.refusal_detector,
                leak_constitutions=sorted({rc.sft.constitution, rc.distill.constitution}), leak_ngram=ev.leak_ngram,
                teacher_template=rc.sft.teacher_template, category_mode=rc.sft.category_mode,
                constitution_title=rc.sft.constitution_title, dtype=dtype, progress=not rc.distill.disable_tqdm,
                judge=ev.judge, baseline=ev.baseline, judge_max_new_tokens=ev.judge_max_new_tokens,
                judge_batch_size=ev.judge_batch_size, n_boot=ev.bootstrap, ci_level=ev.ci_level)


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
    evaluate = not args.skip_eval and bool(rc.eval_prompt_files)
    if evaluate:
        check_eval_inputs(rc)
    setup_logging()
    sft_teacher(rc.sft)
    distill(rc.distill)
    if not evaluate:
        print(f"copsd run: teacher in {rc.sft.output_dir}, student in {rc.distill.output_dir}")
        return 0
    # Under a launcher (DDP / FSDP2) the evaluation runs once, in the main process: the processes meet, the
    # group is closed, the others end here (cli.main then exits every launched process without teardown).
    from copsd.cli import _close_process_group
    from copsd.commands._common import is_main_process

    if _close_process_group():
        args._distributed_ended = True
        if not is_main_process():
            return 0
    try:
        from copsd.eval import evaluate_models
    except ImportError as e:
        raise ValueError(f"copsd run: the evaluation module is unavailable ({e}); use --skip_eval") from None
    out = os.path.join(os.path.dirname(rc.distill.output_dir.rstrip("/")), "eval")
    models = [{"name": "base", "path": rc.sft.model_name_or_path},
              {"name": "teacher", "path": rc.sft.output_dir, "constitution": rc.sft.constitution},
              {"name": "student", "path": rc.distill.output_dir}]
    evaluate_models(models, rc.eval_prompt_files, out, **eval_kwargs(rc))
    # evaluate_models printed the table; the whole report is in report.json (no JSON dump here)
    print(f"copsd run: teacher in {rc.sft.output_dir}, student in {rc.distill.output_dir}, evaluation in {out} "
          f"(report: {os.path.join(out, 'report.json')})")
    return 0
