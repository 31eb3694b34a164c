"""bench_e2e_cpu.py on a tiny shape: copsd's steps run and train, the split adds up, TRL peers are skipped with a
message when TRL is absent (simulated here, whatever is installed).

Run: ``pytest benchmarks/test_bench_e2e_cpu.py`` (a few seconds; speed is measured by the script, never asserted).
"""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_e2e_cpu as B  # noqa: E402

TINY = ["--prompts", "2", "--G", "2", "--new-tokens", "4", "--hidden", "32", "--layers", "1", "--heads", "2",
        "--kv-heads", "1", "--intermediate", "64", "--vocab", "512", "--steps", "2", "--warmup", "1", "--lr", "1e-3",
        "--quiet"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_e2e_tiny_copsd_runs_trains_and_skips_absent_trl(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError: TRL absent
    a = B.parse_args(TINY + ["--impl", "copsd:jsd", "copsd:paper", "trl:gkd", "trl:distill"])
    res = B.run(a)

    assert res["impls"] == ["copsd:jsd", "copsd:paper"]
    assert set(res["skipped"]) == {"trl:gkd", "trl:distill"}
    assert all("not installed" in why for why in res["skipped"].values())
    n_samples = 2 * 2
    for name in res["impls"]:
        check = res["checks"][name]
        # every trainable tensor moved in the warm-up step (AdamW, lr 1e-3): the step trained the student
        assert check["trainable_tensors"] > 0
        assert check["changed_tensors_after_warmup"] == check["trainable_tensors"], (name, check)
        recs = res["steps"][name]
        assert len(recs) == 2
        for r in recs:
            assert math.isfinite(r["loss"])
            # between one token per answer (EOS first) and the cap, for all G answers of every prompt
            assert n_samples <= r["tokens"] <= n_samples * 4
            for s in B.STAGES[:-1]:
                assert r[s] >= 0, (name, s, r)
            assert r["gen"] > 0 and r["teacher"] > 0 and r["loss_bwd"] > 0 and r["optim"] > 0
            assert abs(sum(r[s] for s in B.STAGES) - r["total"]) < 1e-9
    assert res["steps"]["copsd:paper"][0]["loss"] != res["steps"]["copsd:jsd"][0]["loss"]

    table = B.summarize(res)
    assert "| copsd:jsd |" in table and "| copsd:paper |" in table
    assert "| trl:gkd | skipped: not installed" in table
    assert "Same-round speed-up" not in table  # no peer ran


def test_e2e_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        B.parse_args(["--G", "0"])
    with pytest.raises(SystemExit):
        B.parse_args(["--impl", "trl:sft"])


def test_e2e_base_variant_turns_the_speed_ups_off_for_its_steps_only(monkeypatch):
    from copsd import distill, rollout

    seen = []
    real = rollout._generate
    monkeypatch.setattr(rollout, "_generate", lambda *a, **kw: seen.append(
        (rollout._IN_PLACE_CACHE, distill._STATS_FROM_DIVERGENCE)) or real(*a, **kw))
    a = B.parse_args(TINY + ["--impl", "copsd:jsd", "copsd:jsd-base", "--steps", "1", "--warmup", "0"])
    res = B.run(a)
    assert res["impls"] == ["copsd:jsd", "copsd:jsd-base"]
    assert seen == [(True, True), (False, False)]  # one step each: with the speed-ups, then without
    assert rollout._IN_PLACE_CACHE is True and distill._STATS_FROM_DIVERGENCE is True
    table = B.summarize(res)
    assert "Before / after in the same rounds" in table and "| copsd:jsd | " in table


def test_gpu_wrapper_runs_on_cpu_when_asked_and_writes_its_files(monkeypatch, tmp_path):
    """bench_e2e_gpu.py (run once per GPU session, where a Python error costs the session its GPU time): its
    defaults are overridden by the arguments given, and with $OUT set it writes the table and the records."""
    import json

    import bench_e2e_gpu as W

    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setitem(sys.modules, "trl", None)
    args = TINY + ["--device", "cpu", "--no-bf16", "--impl", "copsd:jsd"]
    assert W._device_asked(args) == "cpu" and W._device_asked(["--device=cuda"]) == "cuda"
    assert W.main(args) == 0
    assert "| copsd:jsd |" in (tmp_path / "bench_e2e_gpu.md").read_text()
    data = json.loads((tmp_path / "bench_e2e_gpu.json").read_text())
    assert "copsd:jsd" in json.dumps(data)
