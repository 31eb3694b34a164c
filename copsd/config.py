"""Dataclass configs for the trainer, with TRL's field names.

A config comes from three layers, later ones winning: the dataclass defaults, a YAML file
(``--config x.yaml``, read with ``yaml.safe_load``) and command-line flags (``--learning_rate 1e-5``).
Every key is checked against the field's declared type; an unknown or ill-typed key is a
``ValueError`` naming it (and the file it came from).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

OBJECTIVES = ("paper", "reverse_kl", "topk", "jsd", "hybrid")
OLD_LOGPROBS = ("recompute", "rollout")
LOSS_AGGREGATIONS = ("global_token_mean", "micro_batch_token_mean")
TEACHER_MODES = ("checkpoint", "initial", "ema")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
REPORTERS = ("jsonl", "tensorboard", "none")
CATEGORY_MODES = ("replace", "extend")
KINDS = ("harmful", "benign", "general")


def _choices(*options):
    return {"choices": options}


@dataclass
class TrainConfig:
    """Fields shared by both stages."""

    # inputs / outputs
    model_name_or_path: str = ""
    output_dir: str = ""
    overwrite_output_dir: bool = False
    constitution: str = ""
    dataset: str = ""
    trust_remote_code: bool = False
    teacher_template: str = "{constitution}\n\n---\n\n{query}\n\n---"
    # a row's category text replaces the default text ("replace") or follows it ("extend")
    category_mode: str = field(default="replace", metadata=_choices(*CATEGORY_MODES))
    constitution_title: bool = False  # send a Markdown constitution's "# title" line to the teacher
    default_kind: str = field(default="general", metadata=_choices(*KINDS))  # kind of a row without 'kind'
    # TRL's meaning: prompts (student view, in tokens) longer than this are cut from the left ("left": the
    # start of the last user message is cut, so the template and the constitution stay whole) or dropped
    # ("skip"); every such row is counted in the log.  None: no limit (prompts must fit the context).
    max_prompt_length: Optional[int] = None
    prompt_truncation: str = field(default="left", metadata=_choices("left", "skip"))
    # optimisation (TRL / transformers names)
    learning_rate: float = 1e-5
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1
    lr_scheduler_type: str = field(default="constant", metadata=_choices(*SCHEDULERS))
    warmup_ratio: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 42
    bf16: bool = False
    gradient_checkpointing: bool = False
    # LoRA through peft
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: Optional[list[str]] = None
    # vision-language models: the vision encoder (and its merger into the language model) is not trained, and
    # LoRA's default targets leave it out; false trains it too (full fine-tuning, or LoRA on its linear layers)
    freeze_vision_tower: bool = True
    # bookkeeping
    logging_steps: int = 1
    save_steps: int = 0
    save_total_limit: Optional[int] = None
    report_to: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    resume_from_checkpoint: Optional[str] = None
    disable_tqdm: bool = False
    backend: str = "auto"
    # apply weight_decay to 1-D parameters (norms, biases) too, as the reference implementation does
    weight_decay_1d_params: bool = False
    # a named set of defaults under the YAML and flags (see PRESETS); "paper": the paper's hyper-parameters
    preset: str = field(default="", metadata=_choices("", "paper"))

    def validate(self):
        for name in ("model_name_or_path", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"config key '{name}' is required (set it in the YAML or with --{name})")
        _positive("learning_rate", self.learning_rate, allow_zero=True)
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "lora_r"):
            _positive(name, getattr(self, name))
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"config key 'max_steps' must be -1 (use num_train_epochs) or > 0, got {self.max_steps}")
        if self.max_steps == -1:
            _positive("num_train_epochs", self.num_train_epochs)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"config key 'warmup_ratio' must be in [0, 1), got {self.warmup_ratio}")
        if self.save_steps < 0:
            raise ValueError(f"config key 'save_steps' must be >= 0 (0: only the final model), got {self.save_steps}")
        if self.save_total_limit is not None:
            _positive("save_total_limit", self.save_total_limit)
        _positive("max_grad_norm", self.max_grad_norm, allow_zero=True)
        if self.max_prompt_length is not None:
            _positive("max_prompt_length", self.max_prompt_length)
        for r in self.report_to:
            if r not in REPORTERS:
                raise ValueError(f"config key 'report_to' entries must be in {REPORTERS}, got {r!r}")
        if "{constitution}" not in self.teacher_template or "{query}" not in self.teacher_template:
            raise ValueError("config key 'teacher_template' must contain '{constitution}' and '{query}'")
        if not self.constitution:  # none given: the bundled default constitution
            from copsd.constitution import DEFAULT_CONSTITUTION

            self.constitution = DEFAULT_CONSTITUTION
        return self


@dataclass
class SFTTeacherConfig(TrainConfig):
    """Stage 1 (Cross-SFT of the teacher with the constitution in context)."""

    learning_rate: float = 1e-5
    num_train_epochs: float = 2.0
    sft_dataset: Optional[str] = None
    cross_sft_set: Optional[str] = None
    frontier_model: Optional[str] = None
    max_length: int = 1024
    max_completion_length: int = 256
    temperature: float = 1.0
    generation_batch_size: int = 16
    # an own (or frontier) answer cut at max_completion_length: left out of the set ("drop") or trained without
    # an end-of-turn token ("no_eos"); never trained with one (that would teach the teacher to stop at the cap)
    truncated_answers: str = field(default="drop", metadata=_choices("drop", "no_eos"))

    def validate(self):
        super().validate()
        if not (self.dataset or self.sft_dataset or self.cross_sft_set):
            raise ValueError("config needs 'dataset' (prompt rows), 'sft_dataset' or 'cross_sft_set'")
        _positive("max_length", self.max_length)
        _positive("max_completion_length", self.max_completion_length)
        _positive("temperature", self.temperature)
        _positive("generation_batch_size", self.generation_batch_size)
        return self


@dataclass
class DistillConfig(TrainConfig):
    """Stage 2 (constitution-conditioned on-policy distillation).

    One training *step* is one on-policy iteration: a rollout batch of
    ``per_device_train_batch_size * gradient_accumulation_steps * num_mini_batches`` completions per
    device (``num_generations`` per prompt), scored by the teacher, then ``num_mini_batches``
    optimizer steps over it.
    """

    learning_rate: float = 2e-6
    per_device_train_batch_size: int = 16
    # defaults follow docs/method.md: G = 16, T = 1.0, top-p 1, up to 2048 new tokens, 4 mini-batches per rollout batch
    num_generations: int = 16
    max_completion_length: int = 2048
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # completions per generation call on one device (a multiple of num_generations); None: all of the
    # step's completions on the device in one call.  num_generations (one prompt per call) makes results
    # independent of the process count as well as of resumes, at the cost of GPU throughput.
    generation_batch_size: Optional[int] = None
    num_mini_batches: int = 4
    objective: str = field(default="paper", metadata=_choices(*OBJECTIVES))
    teacher_mode: str = field(default="checkpoint", metadata=_choices(*TEACHER_MODES))
    teacher_model_name_or_path: Optional[str] = None
    ema_decay: float = 0.99
    beta: float = 0.5
    topk: int = 50
    reward_clip_low: float = -3.0
    reward_clip_high: float = 5.0
    reward_bonus: float = 0.02
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    dual_clip: float = 3.0
    kl_coef: float = 0.005
    kl_clamp: Optional[float] = 10.0  # k3 clamped at this value (the reference's); null: no clamp
    # pi_old of the PPO ratio: "recompute" (the student's log-probs from a forward pass before the update, as
    # the reference) or "rollout" (the sampler's log-probs, no extra pass)
    old_logprobs: str = field(default="recompute", metadata=_choices(*OLD_LOGPROBS))
    # "global_token_mean": loss = token sum / all tokens of the mini-batch (independent of the micro-batch
    # split); "micro_batch_token_mean": the mean over micro-batches of each one's token mean (the reference)
    loss_aggregation: str = field(default="global_token_mean", metadata=_choices(*LOSS_AGGREGATIONS))
    # objective "hybrid": rows scored by the teacher as a judge (their own 'reward' field wins)
    judge_kinds: list[str] = field(default_factory=lambda: ["general"])
    judge_categories: list[str] = field(default_factory=list)
    judge_max_new_tokens: int = 128
    judge_batch_size: int = 8
    prefix_reuse: bool = True
    sample_every_steps: int = 10
    refusal_detector: str = "keyword"
    alarm_length_fraction: float = 0.6
    alarm_entropy_fraction: float = 0.5
    alarm_benign_refusal_increase: float = 0.25
    stop_on_collapse: bool = False

    def validate(self):
        super().validate()
        if not self.dataset:
            raise ValueError("config key 'dataset' is required (prompt rows, JSONL)")
        for name in ("num_generations", "max_completion_length", "num_mini_batches", "topk"):
            _positive(name, getattr(self, name))
        _positive("temperature", self.temperature)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"config key 'top_p' must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"config key 'top_k' must be >= 0 (0: off), got {self.top_k}")
        per_batch = self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_mini_batches
        if per_batch % self.num_generations:
            raise ValueError(
                "per_device_train_batch_size * gradient_accumulation_steps * num_mini_batches "
                f"= {per_batch} must be a multiple of num_generations = {self.num_generations}")
        if self.generation_batch_size is not None:
            _positive("generation_batch_size", self.generation_batch_size)
            if self.generation_batch_size % self.num_generations:
                raise ValueError(f"config key 'generation_batch_size' must be a multiple of num_generations = "
                                 f"{self.num_generations}, got {self.generation_batch_size}")
        if self.objective == "jsd" and not 0 < self.beta < 1:
            raise ValueError(f"config key 'beta' must be in (0, 1) for objective 'jsd', got {self.beta}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"config key 'ema_decay' must be in [0, 1), got {self.ema_decay}")
        if self.reward_clip_low >= self.reward_clip_high:
            raise ValueError("config keys 'reward_clip_low' < 'reward_clip_high' expected, got "
                             f"{self.reward_clip_low} >= {self.reward_clip_high}")
        _positive("epsilon", self.epsilon)
        if self.epsilon_high is not None:
            _positive("epsilon_high", self.epsilon_high)
        if self.dual_clip <= 1:
            raise ValueError(f"config key 'dual_clip' must be > 1, got {self.dual_clip}")
        _positive("kl_coef", self.kl_coef, allow_zero=True)
        if self.teacher_mode == "checkpoint" and not self.teacher_model_name_or_path:
            raise ValueError("teacher_mode 'checkpoint' needs 'teacher_model_name_or_path' "
                             "(the Stage-1 output); or use teacher_mode 'initial' / 'ema'")
        if self.sample_every_steps < 0:
            raise ValueError(f"config key 'sample_every_steps' must be >= 0, got {self.sample_every_steps}")
        if self.kl_clamp is not None:
            _positive("kl_clamp", self.kl_clamp)
        for name in ("judge_max_new_tokens", "judge_batch_size"):
            _positive(name, getattr(self, name))
        for k in self.judge_kinds:
            if k not in ("harmful", "benign", "general"):
                raise ValueError(f"config key 'judge_kinds' entries must be harmful, benign or general, got {k!r}")
        return self


@dataclass
class RunConfig:
    """``copsd run``: Stage 1, Stage 2 and an evaluation.

    The YAML has top-level keys shared by the stages and optional ``sft:``, ``distill:`` and
    ``eval:`` sections; ``output_dir/teacher``, ``output_dir/student`` and ``output_dir/eval``
    receive the three outputs.
    """

    sft: SFTTeacherConfig
    distill: DistillConfig
    eval: EvalConfig = field(default_factory=lambda: EvalConfig())

    @property
    def eval_prompt_files(self) -> list[str]:
        return self.eval.prompt_files

    @property
    def eval_max_new_tokens(self) -> int:
        return self.eval.max_new_tokens


RUN_MODELS = ("base", "teacher", "student")


@dataclass
class EvalConfig:
    """``copsd run``'s ``eval:`` section (``--eval.<key>`` flags): ``copsd eval``'s options, same names and
    defaults.  The paper evaluates with ``greedy: true, max_new_tokens: 512, judge: JUDGE_DIR`` (baseline: the
    base model); a top-level ``preset: paper`` sets the first two.  The models are ``base``, ``teacher`` (in
    its teacher view: the Stage-1 constitution, ``teacher_template``, ``category_mode`` and
    ``constitution_title``) and ``student``."""

    prompt_files: list[str] = field(default_factory=list)  # empty: no evaluation
    max_new_tokens: int = 256
    num_samples: Optional[int] = None  # None: 4, or 1 with greedy
    temperature: float = 1.0  # 0: greedy
    greedy: bool = False  # greedy decoding, as the paper evaluates (same as temperature 0)
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 16  # prompts per generation batch
    refusal_detector: Optional[str] = None  # None: the distill stage's refusal_detector
    judge: Optional[str] = None  # a local chat-model directory: safety, helpfulness, pairwise win-rate
    baseline: str = field(default="base", metadata=_choices(*RUN_MODELS))  # compared with pairwise
    judge_max_new_tokens: int = 128
    judge_batch_size: int = 8
    bootstrap: int = 1000  # bootstrap resamples (of prompts) for the intervals
    ci_level: float = 0.95
    leak_ngram: int = 8
    bf16: Optional[bool] = None  # load the models in bfloat16; None: as the stages (the distill stage's bf16)

    def validate(self):
        for name in ("max_new_tokens", "batch_size", "judge_max_new_tokens", "judge_batch_size", "bootstrap",
                     "leak_ngram"):
            _positive(f"eval.{name}", getattr(self, name))
        if self.num_samples is not None:
            _positive("eval.num_samples", self.num_samples)
        _positive("eval.temperature", self.temperature, allow_zero=True)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"config key 'eval.top_p' must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"config key 'eval.top_k' must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.ci_level < 1:
            raise ValueError(f"config key 'eval.ci_level' must be in (0, 1), got {self.ci_level}")
        return self

    def decoding(self) -> tuple[float, int]:
        """(temperature, num_samples) as ``copsd eval`` resolves them: greedy is temperature 0, and the
        default number of samples is 1 when greedy, else 4."""
        from copsd.eval import resolve_decoding

        return resolve_decoding(self.greedy, self.temperature, self.num_samples)


# The paper's hyper-parameters (a verl run on 8 GPUs: 128 prompts x G = 16 per step in 4 mini-batches of 32
# prompts, micro-batches of 8 sequences).  Here for one process: 8 x 64 accumulation x 4 mini-batches = 2048
# completions = 128 prompts; with N processes divide gradient_accumulation_steps by N to keep 128 prompts.
PRESETS = {
    "paper": {
        "SFTTeacherConfig": {"num_train_epochs": 2.0, "weight_decay": 0.01, "weight_decay_1d_params": True},
        "DistillConfig": {
            "learning_rate": 2e-6, "num_generations": 16, "max_completion_length": 2048, "temperature": 1.0,
            "top_p": 1.0, "top_k": 0, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 64,
            "num_mini_batches": 4, "num_train_epochs": 3.0, "lr_scheduler_type": "constant", "warmup_ratio": 0.0,
            "weight_decay": 0.01, "weight_decay_1d_params": True, "max_grad_norm": 1.0, "reward_clip_low": -3.0,
            "reward_clip_high": 5.0, "reward_bonus": 0.02, "epsilon": 0.2, "dual_clip": 3.0, "kl_coef": 0.005,
            "kl_clamp": 10.0, "old_logprobs": "recompute", "loss_aggregation": "micro_batch_token_mean",
            "gradient_checkpointing": True,
        },
        # copsd run's evaluation when the preset is a top-level key: greedy, up to 512 new tokens
        "EvalConfig": {"greedy": True, "max_new_tokens": 512},
    },
}


def preset_values(cls, name, where: str = "") -> dict:
    """The values preset ``name`` gives to ``cls`` (``{}`` for no preset); the other keys keep their defaults."""
    if not name:
        return {}
    if name not in PRESETS:
        raise ValueError(f"config key 'preset'{where} must be one of {sorted(PRESETS)}, got {name!r}")
    fields = _fields(cls)
    out = {}
    for base in cls.__mro__:
        for k, v in PRESETS[name].get(base.__name__, {}).items():
            if k in fields:
                out.setdefault(k, v)
    return out


def _positive(name, value, allow_zero=False):
    bad = (value < 0) if allow_zero else (value <= 0)
    if isinstance(value, float) and not math.isfinite(value) or bad:
        raise ValueError(f"config key '{name}' must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


# --------------------------------------------------------------------------- type checking

def _type_name(tp) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_name(inner[0]) if len(inner) == 1 else " or ".join(_type_name(a) for a in inner)
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(key: str, value: Any, tp, where: str = ""):
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float). ValueError otherwise."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(key, value, a, where)
            except ValueError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str) and inner is str:  # "a,b" from a flag or a YAML scalar
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ValueError(f"config key '{key}'{where} must be a list of {_type_name(inner)}, got {value!r}")
        return [coerce(key, v, inner, where) for v in value]
    if tp is float and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads 1e-5 (no dot) as a string; TRL's parsers take it as a number, and so do we
        try:
            value = float(value)
        except ValueError:
            pass
    ok = (tp is bool and isinstance(value, bool)
          or tp is int and isinstance(value, int) and not isinstance(value, bool)
          or tp is float and isinstance(value, (int, float)) and not isinstance(value, bool)
          or tp is str and isinstance(value, str))
    if not ok:
        raise ValueError(f"config key '{key}'{where} must be {_type_name(tp)}, got {value!r} "
                         f"({type(value).__name__})")
    return float(value) if tp is float else value


def _fields(cls):
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def build_config(cls, values: dict, where: str = ""):
    """Instantiate ``cls`` from a dict, checking every key; does not call ``validate``."""
    if not isinstance(values, dict):
        raise ValueError(f"config{where} must be a mapping of keys to values, got {type(values).__name__}")
    fields = _fields(cls)
    if values.get("preset"):  # the preset's values sit under the given ones
        values = {**preset_values(cls, values["preset"], where), **values}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"unknown config key '{key}'{where} for {cls.__name__}; "
                             f"known keys: {', '.join(sorted(fields))}")
        f, tp = fields[key]
        # resume_from_checkpoint accepts true (latest checkpoint in output_dir), false or a path
        if key == "resume_from_checkpoint":
            if isinstance(value, str) and value.lower() in ("true", "false"):
                value = value.lower() == "true"
            if isinstance(value, bool):
                value = "latest" if value else None
        value = coerce(key, value, tp, where)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ValueError(f"config key '{key}'{where} must be one of {choices}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def read_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"config file {path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of keys to values at the top level")
    return data


# --------------------------------------------------------------------------- command line

def _parse_flag_value(text: str, tp):
    """Parse a command-line string for a field of type ``tp`` (YAML scalar rules: 1e-5, true, null)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        tp = args[0]
        origin = typing.get_origin(tp)
    if tp is str:
        return text
    if origin is list:
        return [v.strip() for v in text.split(",") if v.strip()]
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if tp is float and isinstance(value, str):  # yaml reads "1e-5" as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def add_config_arguments(parser: argparse.ArgumentParser, cls, prefix: str = ""):
    """``--config`` plus one ``--<field>`` flag per field; only flags given on the command line override."""
    if not prefix:
        parser.add_argument("--config", default=None, help="YAML file with config keys (flags override it)")
    for name, (f, tp) in _fields(cls).items():
        if not dataclasses.is_dataclass(tp) and name not in ("sft", "distill"):
            default = (f.default if f.default is not dataclasses.MISSING
                       else f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            flags = [f"--{prefix}{name}"] + ([f"--{prefix}{name.replace('_', '-')}"] if "_" in name else [])
            parser.add_argument(*flags, dest=f"cfg__{prefix}{name}", default=argparse.SUPPRESS,
                                metavar=_type_name(tp).split()[0].upper(),
                                help=f"(default: {default!r})")


def flag_overrides(args: argparse.Namespace, cls, prefix: str = "") -> dict:
    out = {}
    for name, (_, tp) in _fields(cls).items():
        dest = f"cfg__{prefix}{name}"
        if hasattr(args, dest):
            out[name] = _parse_flag_value(getattr(args, dest), tp)
    return out


def config_from_args(cls, args: argparse.Namespace):
    """YAML (``--config``) then flags; returns a validated ``cls``."""
    values = {}
    where = ""
    if getattr(args, "config", None):
        values = read_yaml(args.config)
        where = f" in {args.config}"
    overrides = flag_overrides(args, cls)
    if "preset" in overrides:  # a preset given as a flag still sits under the YAML
        values = {**values, "preset": overrides["preset"]}
    cfg = build_config(cls, values, where)
    if overrides:
        cfg = build_config(cls, {**_asdict_shallow(cfg), **overrides}, " (command line)")
    return cfg.validate()


def _asdict_shallow(cfg) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- copsd run

RUN_SECTIONS = ("sft", "distill", "eval")


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """Top-level keys go to both stages (where the stage has the key); ``sft:``/``distill:`` sections
    and ``--sft.<key>`` / ``--distill.<key>`` flags go to one stage."""
    raw = read_yaml(args.config) if getattr(args, "config", None) else {}
    where = f" in {args.config}" if getattr(args, "config", None) else ""
    sections = {s: raw.pop(s, None) or {} for s in RUN_SECTIONS}
    for s in RUN_SECTIONS:
        if not isinstance(sections[s], dict):
            raise ValueError(f"config section '{s}'{where} must be a mapping")
    common = dict(raw)
    common.update(flag_overrides(args, _CommonKeys))
    sft_keys, distill_keys = set(_fields(SFTTeacherConfig)), set(_fields(DistillConfig))
    for key in common:
        if key not in sft_keys and key not in distill_keys:
            raise ValueError(f"unknown config key '{key}'{where}; stage-specific keys go under 'sft:' or "
                             "'distill:'")
    out_dir = common.get("output_dir", "")
    sft_values = {k: v for k, v in common.items() if k in sft_keys}
    distill_values = {k: v for k, v in common.items() if k in distill_keys}
    if out_dir:
        sft_values["output_dir"] = f"{out_dir}/teacher"
        distill_values["output_dir"] = f"{out_dir}/student"
        distill_values.setdefault("teacher_model_name_or_path", f"{out_dir}/teacher")
    sft_values.update(sections["sft"])
    sft_values.update(flag_overrides(args, SFTTeacherConfig, "sft."))
    distill_values.update(sections["distill"])
    distill_values.update(flag_overrides(args, DistillConfig, "distill."))
    sft = build_config(SFTTeacherConfig, sft_values, where).validate()
    distill = build_config(DistillConfig, distill_values, where).validate()
    eval_fields = _fields(EvalConfig)
    for key in sections["eval"]:
        if key not in eval_fields:
            raise ValueError(f"unknown config key 'eval.{key}'{where}; known: {', '.join(sorted(eval_fields))}")
    given = {k: (v, f" (preset {common['preset']!r})")
             for k, v in preset_values(EvalConfig, common.get("preset"), where).items()}
    given.update({k: (v, where) for k, v in sections["eval"].items()})
    given.update({k: (v, " (command line)") for k, v in flag_overrides(args, EvalConfig, "eval.").items()})
    values = {}
    for name, (value, at) in given.items():  # checked here so that an error names the key 'eval.<key>'
        f, tp = eval_fields[name]
        value = coerce(f"eval.{name}", value, tp, at)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ValueError(f"config key 'eval.{name}'{at} must be one of {choices}, got {value!r}")
        values[name] = value
    return RunConfig(sft=sft, distill=distill, eval=EvalConfig(**values).validate())


@dataclass
class _CommonKeys(DistillConfig, SFTTeacherConfig):
    """Union of both stages' keys, for the ``copsd run`` top-level flags."""


def add_run_arguments(parser: argparse.ArgumentParser):
    add_config_arguments(parser, _CommonKeys)
    add_config_arguments(parser, SFTTeacherConfig, prefix="sft.")
    add_config_arguments(parser, DistillConfig, prefix="distill.")
    add_config_arguments(parser, EvalConfig, prefix="eval.")
