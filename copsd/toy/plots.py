"""The demo's training-dynamics figure: the collapse signature of naive OPSD next to COPSD, per step.

Each distillation run writes one ``metrics.jsonl`` row per step (``copsd.distill``); the figure
plots, for every run, the rollouts' mean completion length, their mean token entropy and the
refusal rates on benign and on harmful prompts against the step.  Per-step values come from one
rollout batch (a few prompts), so each panel draws them faintly and a centred moving average on top.
"""

from __future__ import annotations

import json
import math
import os

# (metrics.jsonl key, panel title, y label)
PANELS = (
    ("completion_length", "answer length", "mean completion length (tokens)"),
    ("entropy", "token entropy", "mean token entropy (nats)"),
    ("refusal_rate_benign", "benign refusal", "refusal rate on benign prompts"),
    ("refusal_rate_harmful", "harmful refusal", "refusal rate on harmful prompts"),
)


def read_metrics(path: str) -> list[dict]:
    """The rows of a ``metrics.jsonl`` file, in step order (a resumed run's repeated steps: last wins)."""
    rows: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
            if "step" not in row:
                raise ValueError(f"{path}:{n}: row has no 'step'")
            rows[int(row["step"])] = row
    return [rows[s] for s in sorted(rows)]


def moving_average(values: list[float | None], window: int) -> list[float | None]:
    """Centred moving average over the finite values in each window (None where there are none)."""
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window: expected a positive int, got {window!r}")
    half = window // 2
    out: list[float | None] = []
    for i in range(len(values)):
        xs = [v for v in values[max(0, i - half): i + half + 1] if v is not None and math.isfinite(v)]
        out.append(sum(xs) / len(xs) if xs else None)
    return out


def plot_training_dynamics(runs: dict[str, str], out_png: str, *, window: int = 15,
                           title: str = "training dynamics: naive OPSD vs COPSD") -> str:
    """Draw ``runs`` (``{label: metrics.jsonl path}``) into ``out_png``; returns ``out_png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        raise ValueError("runs: expected at least one {label: metrics.jsonl path}")
    data = {label: read_metrics(path) for label, path in runs.items()}
    colors = ("tab:red", "tab:blue", "tab:green", "tab:purple")
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    for ax, (key, name, ylabel) in zip(axes.flat, PANELS):
        for (label, rows), color in zip(data.items(), colors):
            steps = [r["step"] for r in rows]
            ys = [r.get(key) for r in rows]
            if not any(y is not None for y in ys):
                continue
            raw = [(s, y) for s, y in zip(steps, ys) if y is not None]
            ax.plot([s for s, _ in raw], [y for _, y in raw], color=color, alpha=0.2, linewidth=0.8)
            smooth = [(s, y) for s, y in zip(steps, moving_average(ys, window)) if y is not None]
            ax.plot([s for s, _ in smooth], [y for _, y in smooth], color=color, linewidth=2, label=label)
        ax.set_title(name)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
        if key.startswith("refusal"):
            ax.set_ylim(-0.03, 1.03)
    for ax in axes[1]:
        ax.set_xlabel("distillation step")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.suptitle(f"{title}\n(students without the constitution; faint: per step, bold: {window}-step average)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
