"""``copsd eval``: refusal, helpfulness, length, entropy, diversity and leakage for one or more models,
with bootstrap intervals; optionally judged by a local chat model (``--judge``).

The paper's evaluation settings: ``--greedy --max_new_tokens 512 --judge JUDGE_DIR --baseline base``.
"""

NAME = "eval"
HELP = "evaluate models (base, teacher, students) on JSONL prompt sets: safety vs helpfulness and collapse metrics"


def add_arguments(parser):
    parser.add_argument(
        "--model", action="append", required=True, metavar="[NAME=]PATH",
        help="a local model directory; repeat to compare several models in one table (NAME defaults to "
             "the directory name)")
    parser.add_argument(
        "--constitution", action="append", default=[], metavar="NAME=FILE",
        help="evaluate model NAME with this constitution in its user turn (the teacher view); repeatable. "
             "To evaluate one model both ways, give it twice under two names")
    parser.add_argument("--teacher_template", default=None, metavar="TEXT",
                        help="the teacher view's user turn, with {constitution} and {query}, as the training "
                             "key teacher_template (default: the training default)")
    parser.add_argument("--category_mode", default="replace", choices=("replace", "extend"),
                        help="a row's category text replaces the constitution's default text or follows it, as "
                             "the training key category_mode (default: replace)")
    parser.add_argument("--constitution_title", nargs="?", const=True, default=False, type=parse_bool,
                        metavar="BOOL", help="send a Markdown constitution's '# title' line, as the training "
                                             "key constitution_title (default: false)")
    parser.add_argument("--prompts", action="append", required=True, metavar="FILE",
                        help="a prompt file (JSONL / JSON / parquet in TRL's prompt formats; an optional 'kind' of "
                             "harmful/benign/general per row); repeatable")
    parser.add_argument("--output_dir", required=True, help="where report.json, responses and plots go")
    parser.add_argument("--num_samples", type=int, default=None,
                        help="samples per prompt (default 4, or 1 with --greedy; diversity needs >= 2)")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="(the paper evaluates with 512)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--greedy", action="store_true",
                        help="greedy decoding, as the paper evaluates (same as --temperature 0)")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=16, help="prompts per generation batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refusal_detector", default="keyword",
                        help="'keyword', 'classifier:PATH', 'judge:PATH' or a local model directory")
    parser.add_argument("--judge", default=None, metavar="MODEL_DIR",
                        help="a local chat model that judges the responses: pointwise safety and helpfulness "
                             "(1-10) and a pairwise win-rate against --baseline, both orders (no API calls). "
                             "The keyword detector stays the fast default for refusal rates")
    parser.add_argument("--baseline", default=None, metavar="NAME",
                        help="the --model the others are compared with pairwise (default: the first)")
    parser.add_argument("--judge_max_new_tokens", type=int, default=128, help="judge reply budget (greedy)")
    parser.add_argument("--judge_batch_size", type=int, default=8)
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap resamples (of prompts) for the confidence intervals")
    parser.add_argument("--ci_level", type=float, default=0.95)
    parser.add_argument("--leak_constitution", action="append", default=None, metavar="FILE",
                        help="constitution whose text counts as leaked (default: every --constitution file)")
    parser.add_argument("--leak_ngram", type=int, default=8, help="words in a row that count as a leak")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--bf16", nargs="?", const=True, default=False, type=parse_bool, metavar="BOOL",
                        help="load the models in bfloat16 (--bf16, or --bf16 true/false as in training)")
    parser.add_argument("--no_plots", action="store_true")
    parser.add_argument("--no_progress", action="store_true")


def parse_bool(text) -> bool:
    """``true``/``false`` (also yes/no, 1/0), case-insensitive: the values a training flag takes."""
    import argparse

    value = str(text).strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_models(model_args, constitution_args) -> list[dict]:
    """``["base=/m", "/x/student"]`` + ``["base=c.md"]`` -> model dicts for ``evaluate_models``."""
    import os

    models, names = [], set()
    for spec in model_args:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(spec)) or spec, spec
        if not name or not path:
            raise ValueError(f"--model: expected [NAME=]PATH, got {spec!r}")
        if name in names:
            raise ValueError(f"--model: the name {name!r} is used twice; give each model its own NAME=")
        names.add(name)
        models.append({"name": name, "path": path, "constitution": None})
    by_name = {m["name"]: m for m in models}
    for spec in constitution_args:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise ValueError(f"--constitution: expected NAME=FILE, got {spec!r}")
        if name not in by_name:
            raise ValueError(f"--constitution: no --model named {name!r} (models: {sorted(by_name)})")
        by_name[name]["constitution"] = path
    return models


def run(args):
    from copsd.eval import evaluate_models, resolve_decoding

    dtype = None
    if args.bf16:
        import torch

        dtype = torch.bfloat16
    temperature, num_samples = resolve_decoding(args.greedy, args.temperature, args.num_samples)
    evaluate_models(
        parse_models(args.model, args.constitution), args.prompts, args.output_dir,
        num_samples=num_samples, max_new_tokens=args.max_new_tokens, temperature=temperature,
        top_p=args.top_p, top_k=args.top_k, batch_size=args.batch_size, seed=args.seed,
        refusal_detector=args.refusal_detector, leak_constitutions=args.leak_constitution,
        leak_ngram=args.leak_ngram, teacher_template=args.teacher_template, category_mode=args.category_mode,
        constitution_title=args.constitution_title, device=args.device, dtype=dtype, progress=not args.no_progress,
        plots=not args.no_plots, print_table=True, judge=args.judge, baseline=args.baseline,
        judge_max_new_tokens=args.judge_max_new_tokens, judge_batch_size=args.judge_batch_size,
        n_boot=args.bootstrap, ci_level=args.ci_level)
    print(f"report: {args.output_dir}/report.json")
    return 0
