"""copsd.judge (verdict parser, pairwise scoring, bootstrap intervals) and ``copsd eval --judge``."""

import json

import pytest
from test_eval import tiny  # noqa: F401  (module fixture: a tiny random model + toy tokenizer + prompts)

from copsd import eval as ev
from copsd.judge import (
    Judge,
    JudgeOutput,
    bootstrap_ci,
    fill,
    outcome_prompt,
    pair_scores,
    parse_choice,
    parse_score,
)


@pytest.mark.parametrize("text, expected", [
    ("Score: 7", 7.0),
    ("The reply is fine.\nScore: 9", 9.0),
    ("**Score:** 8", 8.0),
    ("score = 3", 3.0),
    ("The score is 4.", 4.0),
    ("Rating: 6/10", 6.0),
    ("Rating: 6 out of 10", 6.0),
    ("Rating: [[5]]", 5.0),
    ("[[2]]", 2.0),
    ("7", 7.0),
    ("  10.  ", 10.0),
    ("Correctness: 2.5", 2.5),
    ("First I thought Score: 3.\nScore: 8", 8.0),        # the final line's verdict wins
])
def test_parse_score_accepts(text, expected):
    assert parse_score(text, 1, 10) == expected


@pytest.mark.parametrize("text", [
    "", "   ", None, 7, "Score:", "no verdict here at all", "it has 3 parts and 5 steps",
    "Score: 11", "Score: 0", "Score: -2", "Rating: 6/5", "Score: nan",
    "Score: 3 and Score: 8 are both possible, I am unsure\nthe end",   # conflicting, no final verdict line
    "\x00\x01 <unk> <unk> ##", "Score: 1e9",
])
def test_parse_score_malformed_is_none(text):
    assert parse_score(text, 1, 10) is None


def test_parse_score_scale():
    assert parse_score("Score: 0", 0, 10) == 0.0
    assert parse_score("Score: 0.7", 0, 1) == 0.7
    assert parse_score("Score: 7/10", 0, 1) is None        # denominator must match the scale


@pytest.mark.parametrize("text, expected", [
    ("Winner: A", "A"), ("winner: B", "B"), ("Winner: tie", "tie"), ("Winner: TIE", "tie"), ("[[B]]", "B"),
    ("Verdict: Reply A", "A"), ("B", "B"), ("  A. ", "A"), ("Reply B", "B"), ("**Winner:** B", "B"),
    ("A is shorter, but Winner: A\nWinner: B", "B"),
])
def test_parse_choice_accepts(text, expected):
    assert parse_choice(text) == expected


@pytest.mark.parametrize("text", [
    "", None, 3, "the answer: a dog", "a", "Winner: C", "both are bad",
    "Winner: A, no wait, Winner: B, hmm\nhard to say",
])
def test_parse_choice_malformed_is_none(text):
    assert parse_choice(text) is None


def test_pair_scores_cancel_position_bias():
    # a judge that always prefers position A: the candidate wins once and loses once -> 0.5
    assert pair_scores(["A", "A"], ["A", "A"]) == [0.5, 0.5]
    assert pair_scores(["A", "B", "tie", None, None], ["B", "A", "tie", "B", None]) == [1.0, 0.0, 0.5, 1.0, None]


def test_fill_leaves_other_braces_alone():
    assert fill("{query} | {response}", query="{response}", response="x{y}") == "{response} | x{y}"
    p = outcome_prompt("Be safe.", "q?", "r.", reference="ref")
    assert p.startswith("Be safe.") and "[Reference answer]\nref" in p and "Score: N" in p
    assert "[Reference answer]" not in outcome_prompt("Be safe.", "q?", "r.")


def test_bootstrap_ci_basic():
    vals = [1.0] * 30 + [0.0] * 70
    lo, hi = bootstrap_ci(vals, n_boot=2000, seed=1)
    assert lo < 0.3 < hi and 0.15 < lo and hi < 0.45
    assert bootstrap_ci(vals, n_boot=2000, seed=1) == (lo, hi)                   # seeded
    lo2, hi2 = bootstrap_ci(vals * 16, n_boot=2000, seed=1)
    assert hi2 - lo2 < (hi - lo) / 2.5                                          # ~ 1/sqrt(n)
    assert bootstrap_ci([None, float("nan")]) is None
    assert bootstrap_ci([0.5, None, 0.5]) == (0.5, 0.5)


def test_bootstrap_ci_resamples_clusters():
    # 10 prompts x 8 identical samples: the cluster interval is as wide as that of 10 independent values,
    # much wider than treating the 80 samples as independent
    per_prompt = [float(i % 2) for i in range(10)]
    vals = [v for v in per_prompt for _ in range(8)]
    clusters = [i for i in range(10) for _ in range(8)]
    w_cluster = (lambda c: c[1] - c[0])(bootstrap_ci(vals, clusters, n_boot=3000, seed=0))
    w_indep = (lambda c: c[1] - c[0])(bootstrap_ci(vals, n_boot=3000, seed=0))
    w_ten = (lambda c: c[1] - c[0])(bootstrap_ci(per_prompt, n_boot=3000, seed=0))
    assert w_cluster > 2 * w_indep
    assert w_cluster == pytest.approx(w_ten, rel=0.25)


class ScriptedJudge(Judge):
    """A judge whose replies are fixed strings (cycled), to check the aggregation exactly."""

    def __init__(self, model, tok, replies):
        super().__init__(model, tok, max_new_tokens=4)
        self.replies = replies
        self.seen = []

    def generate(self, prompts):
        self.seen += list(prompts)
        return [self.replies(p) for p in prompts]


def _run(tiny, out, **kw):  # noqa: F811
    models = [{"name": "base", "path": tiny["dir"]},
              {"name": "teacher", "path": tiny["dir"], "constitution": tiny["constitution"]}]
    args = dict(num_samples=2, max_new_tokens=6, batch_size=6, seed=3, progress=False, print_table=False,
                plots=False, n_boot=200)
    args.update(kw)
    return ev.evaluate_models(models, [tiny["prompts"]], str(out), **args)


def test_eval_with_scripted_judge_aggregates_exactly(tiny, tmp_path):  # noqa: F811
    def reply(prompt):
        if "Reply A" in prompt:
            return "Winner: A"                       # position bias: always the first reply
        if "for safety" in prompt:
            return "Score: 8"
        return "I cannot decide."                    # helpfulness: always malformed

    judge = ScriptedJudge(tiny["model"], tiny["tok"], reply)
    report = _run(tiny, tmp_path, judge=judge)
    n = len(tiny["rows"])
    n_harm = sum(r["kind"] == "harmful" for r in tiny["rows"])
    for m in report["models"]:
        j = m["judge"]
        assert j["safety"]["mean"] == 8.0 and j["safety"]["ci"] == [8.0, 8.0]
        assert j["safety"]["n"] == 2 * n_harm and j["safety"]["malformed"] == 0
        assert j["helpfulness"]["mean"] is None and j["helpfulness"]["ci"] is None
        assert j["helpfulness"]["malformed"] == 2 * (n - n_harm)
    assert "pairwise" not in report["models"][0]["judge"]
    pw = report["models"][1]["judge"]["pairwise"]
    assert pw["baseline"] == "base" and pw["win_rate"] == 0.5 and pw["n_pairs"] == 2 * n
    assert pw["position_consistency"] == 0.0 and pw["malformed_verdicts"] == 0
    # both orders were asked for every pair
    assert sum("[Reply A]" in p for p in judge.seen) == 2 * pw["n_pairs"]
    samples = [json.loads(x) for x in (tmp_path / report["models"][1]["responses_file"]).read_text().splitlines()]
    assert all(s["judge_win_vs_base"] == 0.5 for s in samples)
    for s in samples:
        assert ("judge_safety" in s) == (s["kind"] == "harmful") != ("judge_helpfulness" in s)
    assert report["settings"]["judge"]["baseline"] == "base"


def test_eval_rates_have_bootstrap_intervals(tiny, tmp_path):  # noqa: F811
    report = _run(tiny, tmp_path)
    for m in report["models"]:
        for key in ("harmful_refusal", "benign_compliance", "general_compliance"):
            v, ci = m["metrics"][key], m["metrics_ci"][key]
            assert ci is not None and ci[0] <= v <= ci[1], (key, v, ci)
    text = ev.format_intervals(report)
    assert "95% bootstrap intervals" in text and "harmful_refusal" in text


def test_random_judge_counts_malformed_verdicts_and_never_crashes(tiny, tmp_path):  # noqa: F811
    """The whole judge path on a tiny random-weight model: its verdicts are mostly garbage; every one is
    counted from the raw reply, the step finishes, and over-long prompts are cut to the model's window."""
    report = _run(tiny, tmp_path, judge=tiny["dir"], judge_max_new_tokens=6, baseline="teacher")
    assert report["settings"]["judge"]["baseline"] == "teacher"
    for m in report["models"]:
        samples = [json.loads(x) for x in (tmp_path / m["responses_file"]).read_text().splitlines()]
        for key in ("safety", "helpfulness"):
            raws = [s[f"judge_{key}_raw"] for s in samples if f"judge_{key}_raw" in s]
            expected_bad = sum(parse_score(r, 1, 10) is None for r in raws)
            assert m["judge"][key]["malformed"] == expected_bad
            assert m["judge"][key]["n"] + expected_bad == len(raws) > 0
    pw = report["models"][0]["judge"]["pairwise"]
    assert pw["baseline"] == "teacher" and pw["n_pairs"] + pw["pairs_without_verdict"] == 2 * len(tiny["rows"])
    assert pw["win_rate"] is None or 0.0 <= pw["win_rate"] <= 1.0


def test_judge_output_counts():
    assert JudgeOutput(["a", "b", "c"], [1.0, None, None]).malformed == 2


def test_judge_rejects_bad_arguments(tiny, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="judge max_new_tokens"):
        Judge(tiny["model"], tiny["tok"], max_new_tokens=0)
    with pytest.raises(ValueError, match="local model directory"):
        Judge.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="baseline"):
        _run(tiny, tmp_path, baseline="nobody")


def test_cli_greedy_judge(tiny, tmp_path, capsys):  # noqa: F811
    from copsd.cli import main

    rc = main(["eval", "--model", f"base={tiny['dir']}", "--model", f"student={tiny['dir']}", "--prompts",
               tiny["prompts"], "--output_dir", str(tmp_path), "--greedy", "--max_new_tokens", "4",
               "--judge", tiny["dir"], "--judge_max_new_tokens", "4", "--bootstrap", "100", "--no_plots",
               "--no_progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "win_rate_vs_base" in out and "bootstrap intervals" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["decoding"] == "greedy" and report["settings"]["num_samples"] == 1
