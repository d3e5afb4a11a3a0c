"""Dataset statistics, the eval stage on a run dir, byte-identical regeneration, and the CLI's errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from teams_rl_jax.errors import DataError
from teams_rl_jax.eval import dataset_report as D
from teams_rl_jax.eval import testing as T
from teams_rl_jax.eval.__main__ import main as cli_main
from teams_rl_jax.eval.config import EvalConfig

SEED = 5


def test_distinct_n_and_pairwise_distance_hand_computed():
    """distinct-n over the whole set (not per text), and the O(n d) mean pairwise cosine distance
    equals the brute-force mean over i<j (catches dropping the diagonal correction)."""
    texts = ["the cat sat", "the cat ran"]
    assert [D.distinct_n(texts, n) for n in (1, 2, 3)] == pytest.approx([4 / 6, 3 / 4, 1.0], abs=1e-6)
    rng = np.random.default_rng(SEED)
    e = rng.normal(size=(17, 8))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    mean_d, per = D.mean_pairwise_cosine_distance(e)
    cos = e @ e.T
    iu = np.triu_indices(17, 1)
    assert abs(mean_d - np.mean(1 - cos[iu])) < 1e-12, SEED
    np.testing.assert_allclose(per, [(np.sum(1 - cos[i]) - 0) / 16 for i in range(17)], atol=1e-12)


def test_complexity_counts_the_env_phrase_banks():
    """An instruction holding two add_constraints clauses and one step-by-step clause scores 2 and 1."""
    from teams_rl_jax.env.phrases import BANKS

    text = ("Describe a dog. " + BANKS["add_constraints"][0] + " " + BANKS["add_constraints"][1] + " "
            + BANKS["increase_reasoning_steps"][0])
    c = D.complexity(text)
    assert c["bank_add_constraints"] == 2 and c["bank_increase_reasoning_steps"] == 1 and c["bank_deepening"] == 0
    assert c["sentences"] == 4 and c["step_cues"] >= 1 and c["constraint_cues"] >= 2
    assert D.complexity("Describe a dog.")["bank_add_constraints"] == 0


def test_dataset_stats_uses_summary_queries(tmp_path):
    """Queries by role and per kept instruction come from the generate stage's summary.json."""
    run = T.fake_run_dir(tmp_path / "run", seed=SEED, n=10, checkpoint=False)
    s = D.dataset_stats(run / "data" / "generated.jsonl", summary=run / "data" / "summary.json", encoder=None)
    assert s["size"] == 10 and s["queries"] == {"expert": 30, "instructor": 60, "reviewer": 60}
    assert s["queries_per_kept"] == 15.0 and s["eliminations"]["no_gain"] == 3
    assert sum(s["ops"]["kept_records"].values()) == sum(len(r["meta"]["ops"]) for r in
                                                         D.read_records(run / "data" / "generated.jsonl"))
    assert s["complexity"]["bank_add_constraints"] > 0  # fake records carry the token-edit clauses


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    from teams_rl_jax.eval.stage import run_eval_stage

    run = T.fake_run_dir(tmp_path_factory.mktemp("stage") / "run", seed=SEED, n=24)
    logs: list[str] = []
    rep = run_eval_stage(EvalConfig(), run, log=logs.append)
    first = _snapshot(run / "eval")
    shutil.rmtree(run / "eval")
    run_eval_stage(EvalConfig(), run, log=logs.append)
    return run, rep, first, _snapshot(run / "eval")


def test_stage_offline_default(staged):
    """Generated vs the random baseline, MIA on the SFT export with members = its training set,
    benchmarks skipped without a data dir; all plots written."""
    run, rep, first, _ = staged
    assert [d["name"] for d in rep["datasets"]] == ["generated", "random"]
    assert rep["datasets"][0]["embedding_diversity"]["sample"] == 24
    assert rep["mia"]["loss"]["members"] == 24 and rep["mia"]["loss"]["non_members"] == 24
    assert "SFT training set" in rep["mia"]["notes"][0] and "baselines/random" in rep["mia"]["notes"][1]
    assert any("benchmarks skipped" in n for n in rep["notes"])
    for f in ("report.md", "report.json", "lengths.png", "diversity.png", "ops.png", "roc.png",
              "reward_vs_queries.png"):
        assert f in first, f
    md = first["report.md"].decode()
    assert "| generated | 24 | 150 | 6.250 |" in md and "## Membership inference" in md
    assert json.loads(first["report.json"]) == json.loads(json.dumps(rep))


def test_report_regenerates_identically(staged):
    """Same inputs -> the same bytes for report.md, report.json and every PNG: a second stage run
    (MiniLM, MIA, plots all recomputed) is compared byte by byte. Catches any run-dependent value (a
    wall-clock time, an unseeded sample, set iteration order); the PNGs also carry no matplotlib
    version string, so installs with another matplotlib write the same metadata."""
    _, _, first, second = staged
    assert sorted(first) == sorted(second)
    for name in first:
        assert first[name] == second[name], name
    assert b"Software" not in first["roc.png"]


def test_stage_runs_benchmarks_when_configured(staged, tmp_path):
    """With eval.benchmarks.data_dir set, ARC/HellaSwag/MMLU/TruthfulQA files are scored."""
    from teams_rl_jax.config import from_dict
    from teams_rl_jax.eval.stage import run_eval_stage

    run = staged[0]
    data = tmp_path / "bench"
    T.write_jsonl(data / "arc_easy.jsonl", T.arc_records(3, seed=SEED))
    T.write_jsonl(data / "truthfulqa" / "validation.jsonl", [
        {"question": "What is the sun?", "mc1_targets": {"choices": ["a star", "a moon"], "labels": [1, 0]},
         "mc2_targets": {"choices": ["a star", "a hot star", "a moon"], "labels": [1, 1, 0]}}])
    cfg = from_dict(EvalConfig, {"benchmarks": {"data_dir": str(data), "tasks": ["arc_easy", "truthfulqa_mc1",
                                                                                 "truthfulqa_mc2"]},
                                 "mia": {"enabled": False}, "report": {"enabled": False}})
    rep = run_eval_stage(cfg, run, log=lambda m: None)
    b = rep["benchmarks"]
    assert b["arc_easy"]["n"] == 3 and "acc_norm" in b["arc_easy"] and "acc_norm" not in b["truthfulqa_mc2"]
    assert 0.0 < b["truthfulqa_mc2"]["acc"] < 1.0 and b["truthfulqa_mc1"]["acc"] in (0.0, 1.0)


def test_cli_errors_are_one_line(tmp_path, capsys):
    """Missing task file names it; a malformed record names file:line; exit status 2."""
    ck = str(tmp_path / "no-ckpt")
    (tmp_path / "bench").mkdir()
    assert cli_main(["--checkpoint", ck, "--tasks", "arc_easy", "--data-dir", str(tmp_path / "bench")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "arc_easy.jsonl" in err and "\n" not in err, err
    recs = T.arc_records(3, seed=SEED)
    del recs[1]["answerKey"]
    T.write_jsonl(tmp_path / "bench" / "arc_easy.jsonl", recs)
    assert cli_main(["--checkpoint", ck, "--tasks", "arc_easy", "--data-dir", str(tmp_path / "bench")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{tmp_path / 'bench' / 'arc_easy.jsonl'}:2: missing key 'answerKey'" in err and "\n" not in err, err
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": 3}\n')
    assert cli_main(["--dataset", str(tmp_path / "bad.jsonl"), "--encoder", "none", "--out", str(tmp_path)]) == 2
    assert "bad.jsonl:2:" in capsys.readouterr().err


def test_cli_process_exit_code(tmp_path):
    """The real ``python -m teams_rl_jax.eval`` process prints one error line and exits 2."""
    p = subprocess.run([sys.executable, "-m", "teams_rl_jax.eval", "--checkpoint", str(tmp_path), "--tasks",
                        "hellaswag", "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    lines = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "hellaswag" in lines[0], p.stderr


def test_readers_reject_missing_dir(tmp_path):
    from teams_rl_jax.eval.tasks import load_task

    with pytest.raises(DataError, match="not found"):
        load_task("mmlu", tmp_path / "nope")


def test_mia_members_follow_the_sft_config(tmp_path):
    """Members = what SFT trained on: data/generated.jsonl by default, or the sft.data.path that
    run/config.yaml records; non-members never include a member record."""
    from teams_rl_jax.eval.stage import mia_inputs

    run = T.fake_run_dir(tmp_path / "run", seed=SEED, n=6, checkpoint=False)
    mem, non, notes = mia_inputs(EvalConfig(), run)
    gen = D.read_records(run / "data" / "generated.jsonl")
    assert [m.instruction for m in mem] == [r["instruction"] for r in gen] and "generated.jsonl" in notes[0]
    assert len(non) == 6 and "baselines/random" in notes[1]
    other = run / "data" / "baselines" / "random" / "generated.jsonl"
    (run / "config.yaml").write_text(f"sft:\n  data:\n    path: {other}\n    template: vicuna\n")
    mem, non, notes = mia_inputs(EvalConfig(), run)
    assert [m.instruction for m in mem] == [r["instruction"] for r in D.read_records(other)], notes
    keys = {(m.instruction, m.output) for m in mem}
    assert non and not any((n.instruction, n.output) in keys for n in non) and "demo" in notes[1]
