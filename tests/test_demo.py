"""A shortened ``copsd demo`` end to end on CPU: every phase runs, the report is complete, and the
COPSD student's harmful refusal rate rose above the base's."""

import json
import os

import pytest

from copsd.commands.demo import DemoSettings, check_targets, run_demo
from copsd.eval import METRICS


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from test_toy import TEST_CONFIG

    out = tmp_path_factory.mktemp("demo")
    lines = []
    report = run_demo(str(out), toy_config=TEST_CONFIG, settings=DemoSettings.quick(),
                      cache_dir=str(tmp_path_factory.getbasetemp() / "toy-cache"), progress=False,
                      log=lines.append)
    return out, report, "\n".join(lines)


# The demo fixture pretrains the toy base and runs every phase: minutes on 2 cores.
@pytest.mark.slow
def test_demo_report_is_complete(demo):
    out, report, printed = demo
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["targets"] == json.loads(json.dumps(report["targets"]))
    names = [m["name"] for m in on_disk["eval"]["models"]]
    assert names == ["base", "base_teacher", "cross_sft_teacher", "naive_opsd_student", "copsd_student"]
    for m in on_disk["eval"]["models"]:
        for key in METRICS:
            assert key in m["metrics"], (m["name"], key)
            assert m["metrics"][key] is not None, (m["name"], key)  # the toy prompt sets have every kind
    # teachers are evaluated with the constitution, students and base without it
    consts = {m["name"]: m["constitution"] for m in on_disk["eval"]["models"]}
    assert consts["base"] is None and consts["copsd_student"] is None and consts["naive_opsd_student"] is None
    assert consts["base_teacher"] and consts["cross_sft_teacher"]
    for d in ("naive_opsd_student", "cross_sft_teacher", "copsd_student"):
        assert os.path.isfile(out / d / "config.json")
    assert os.path.isfile(out / "cross_sft_teacher" / "cross_sft_set.jsonl")
    for png in ("safety_vs_helpfulness.png", "lengths.png", "entropy.png"):
        assert (out / "eval" / png).stat().st_size > 1000
    assert (out / "training_dynamics.png").stat().st_size > 1000
    assert on_disk["machine"]["torch"] and on_disk["cpu_seconds"] > 0
    assert "copsd_student" in printed and "harm.refuse" in printed
    assert len(report["targets"]) == 4 and all("passed" in t for t in report["targets"])


@pytest.mark.slow
def test_demo_student_became_safer(demo):
    _, report, _ = demo
    m = {x["name"]: x["metrics"] for x in report["eval"]["models"]}
    assert m["copsd_student"]["harmful_refusal"] > m["base"]["harmful_refusal"]
    # the Cross-SFT teacher is calibrated: safe, yet it answers benign requests
    assert m["cross_sft_teacher"]["benign_compliance"] > m["base_teacher"]["benign_compliance"]


def test_check_targets_logic():
    def report(student, base):
        return {"models": [{"name": "base", "metrics": base}, {"name": "copsd_student", "metrics": student}]}

    base = {"harmful_refusal": 0.0, "benign_compliance": 1.0, "benign_mean_length": 40.0,
            "benign_mean_token_entropy": 1.0}
    good = {"harmful_refusal": 0.95, "benign_compliance": 0.96, "benign_mean_length": 37.0,
            "benign_mean_token_entropy": 0.95}
    assert all(t["passed"] for t in check_targets(report(good, base)))
    bad = dict(good, benign_mean_length=35.0)
    assert [t["passed"] for t in check_targets(report(bad, base))] == [True, True, False, True]


def test_demo_cli_rejects_bad_flags(capsys):
    from copsd.cli import main

    assert main(["demo", "--distill_steps", "0", "--no_progress"]) == 2
    assert "--distill_steps" in capsys.readouterr().err


def test_training_dynamics_plot(tmp_path):
    from copsd.toy.plots import moving_average, plot_training_dynamics, read_metrics

    runs = {}
    for name, shrink in (("naive", 0.5), ("copsd", 1.0)):
        path = tmp_path / f"{name}.jsonl"
        rows = [{"step": s, "completion_length": 40 * (shrink if s > 5 else 1), "entropy": 1.0,
                 "refusal_rate_benign": None if s == 3 else 0.1, "refusal_rate_harmful": s / 10} for s in range(1, 11)]
        # a resumed run repeats a step: the later row wins
        rows.append(dict(rows[-1], entropy=0.5))
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        runs[name] = str(path)
    got = read_metrics(runs["naive"])
    assert [r["step"] for r in got] == list(range(1, 11)) and got[-1]["entropy"] == 0.5
    assert moving_average([1.0, None, 3.0, 5.0], 3) == [1.0, 2.0, 4.0, 4.0]
    assert moving_average([None], 5) == [None]
    png = plot_training_dynamics(runs, str(tmp_path / "out" / "dyn.png"), window=3)
    assert os.path.getsize(png) > 1000
    with pytest.raises(ValueError, match="window"):
        moving_average([1.0], 0)
    with pytest.raises(ValueError, match="runs"):
        plot_training_dynamics({}, str(tmp_path / "x.png"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_metrics(str(bad))


def test_scatter_plot_names_every_model_in_a_legend(tmp_path, monkeypatch):
    """The safety/helpfulness scatter draws no text on the axes (labels there overlapped when models
    landed close together); every model is named, with its coordinates, in the legend instead."""
    from matplotlib.figure import Figure

    from copsd.eval import write_plots

    results = [{"name": n, "metrics": {"benign_compliance": 0.99, "harmful_refusal": h},
                "_lengths": [10.0], "_entropies": [1.0]} for n, h in (("a", 0.90), ("b", 0.91), ("c", 0.05))]
    seen = {}
    orig = Figure.savefig

    def spy(fig, fname, *a, **k):
        if str(fname).endswith("safety_vs_helpfulness.png"):
            ax = fig.axes[0]
            seen["texts"] = list(ax.texts)
            seen["legend"] = [t.get_text() for t in ax.get_legend().get_texts()]
        return orig(fig, fname, *a, **k)

    monkeypatch.setattr(Figure, "savefig", spy)
    files = write_plots(results, str(tmp_path))
    assert (tmp_path / files["safety_vs_helpfulness"]).stat().st_size > 1000
    assert seen["texts"] == []
    assert seen["legend"] == ["a (99%, 90%)", "b (99%, 91%)", "c (99%, 5%)"]
