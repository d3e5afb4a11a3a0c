"""``python -m teams_rl_jax.experiment`` shrunk: four arms, equal budgets, disjoint seed split, killed and resumed."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys

import pytest

from tests.tiny_pipeline import ROOT, cpu_env

ARMS = ("policy", "random", "fixed", "wizardlm")
BATCH, STEPS = 4, 2
SHRINK = ["--set", "generate.max_seeds=16", "--set", f"generate.batch_seeds={BATCH}", "--set", f"generate.steps={STEPS}",
          "--set", "experiment.wizardlm_rounds=2", "--set", "policy.num_updates=2", "--set", "policy.num_envs=8",
          "--set", "eval.mia.max_examples=8", "--set", "sft.global_batch=2", "--set", "generate.progress=false",
          "--set", "generate.schedule=[add_constraints,deepening]", "--set", "policy.compare=[]"]


def _cmd(run_dir):
    return [sys.executable, "-m", "teams_rl_jax.experiment", "--run-dir", str(run_dir), *SHRINK]


def _cache_rows(run_dir) -> int:
    with sqlite3.connect(run_dir / "cache" / "responses.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]


def _rows_by_tag(run_dir) -> dict[str, int]:
    with sqlite3.connect(run_dir / "cache" / "responses.sqlite") as db:
        return dict(db.execute("SELECT tag, COUNT(*) FROM responses GROUP BY tag").fetchall())


@pytest.mark.slow  # four arms through SFT and eval, killed once: ~5 min on the busy 2-core VM
def test_experiment_four_arms_killed_and_resumed(tmp_path):
    exp = tmp_path / "exp"
    # 1. run until the random arm is generating, then SIGKILL (mid-arm: the policy arm is finished)
    proc = subprocess.Popen(_cmd(exp), cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("[random] [sft]"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-30:])
    paid_before = _rows_by_tag(exp)
    assert paid_before.get("arms/policy/data", 0) > 0 and paid_before.get("arms/random/data", 0) > 0, paid_before
    # 2. rerun the same command: finishes, the policy arm's stages skipped, no answer paid again
    out = subprocess.run(_cmd(exp), cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[policy] generate complete (skipped)" in out.stdout
    assert "[random] generate complete (skipped)" in out.stdout
    assert "[policy] [sft] complete" in out.stdout

    rep = json.loads((exp / "report.json").read_text())
    arms = rep["arms"]
    assert sorted(arms) == sorted(ARMS)
    for a in arms.values():
        assert {"queries", "queries_paid", "queries_by_role", "records", "not_equal_rate", "mia_auc", "sft_export",
                "benchmarks"} <= set(a)
        assert a["records"] > 0 and 0.0 <= a["mia_auc"] <= 1.0
        assert (exp / a["sft_export"] / "config.json").is_file()
    # equal budgets: random and fixed get the policy arm's queries (the stage stops at batch granularity)
    budget = rep["budget"]
    assert budget == arms["policy"]["queries"] > 0
    per_batch = BATCH * STEPS  # token-edit operator: one expert query per kept step, at most
    for name in ("random", "fixed"):
        assert abs(arms[name]["queries"] - budget) <= per_batch, (name, arms[name]["queries"], budget)
    # four distinct SFT exports (different data -> different weights)
    exports = {name: (exp / a["sft_export"] / "model.safetensors").read_bytes() for name, a in arms.items()}
    assert len(set(exports.values())) == 4
    # member and non-member seeds disjoint, recorded, and each arm's files split by them
    split = json.loads((exp / "seed_split.json").read_text())
    assert split["members"] and split["non_members"] and not set(split["members"]) & set(split["non_members"])
    assert rep["seeds"] == {"members": len(split["members"]), "non_members": len(split["non_members"])}
    for name in ARMS:
        data = exp / "arms" / name / "data"
        for fname, ids in (("members.jsonl", split["members"]), ("non_members.jsonl", split["non_members"])):
            rows = [json.loads(x) for x in (data / fname).read_text().splitlines()]
            assert rows and all(r["meta"]["seed_id"] in ids for r in rows), (name, fname)
    # no query paid twice: every cached answer is attributed to exactly one arm
    assert _cache_rows(exp) == sum(a["queries_paid"] for a in arms.values())
    after = _rows_by_tag(exp)
    assert {t: after[t] for t in paid_before} == paid_before  # the finished arms paid nothing on the rerun
    assert arms["random"]["queries_paid"] == paid_before["arms/random/data"]
    assert (exp / "roc.png").stat().st_size > 0
    md = (exp / "report.md").read_text()
    assert "not the paper's result" in md and "| wizardlm |" in md
    assert rep["wizardlm_vs_policy"]["tokens"] > 0 and all(a["tokens"] > 0 for a in arms.values())
    # 3. the shared policy stage redone (its recorded checkpoint digest changes): the policy arm's
    #    generation is redone, not skipped on its own marker (the same policy here: all replayed, none paid)
    marker = exp / ".stages" / "policy.json"
    rec = json.loads(marker.read_text())
    rec["artifacts"] = {k: "0" * 64 for k in rec["artifacts"]}
    marker.write_text(json.dumps(rec))
    rows_before = _cache_rows(exp)
    out = subprocess.run(_cmd(exp) + ["--set", "experiment.arms=[policy]"], cwd=ROOT, env=cpu_env(),
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[policy] redoing generate (the shared policy stage was redone" in out.stdout, out.stdout[-3000:]
    assert _cache_rows(exp) == rows_before


def test_experiment_config_errors(tmp_path):
    out = subprocess.run([sys.executable, "-m", "teams_rl_jax.experiment", "--run-dir", str(tmp_path),
                          "--set", "experiment.arms=[random]"], cwd=ROOT, env=cpu_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "experiment.arms" in out.stderr, out.stderr


def test_paper_preset_is_an_experiment_config_whose_arms_use_its_protocol(tmp_path):
    """``python -m teams_rl_jax.experiment --config configs/paper_llama2_7b_gpu.yaml`` (docs): the paper
    preset loads as an experiment config, and with no ``experiment.protocol`` the equal-budget arms take
    its ``generate.protocol: paper`` (the reference's overrides), the wizardlm arm its own protocol.
    Catches: the arms silently run the filtered protocol under the paper preset."""
    from teams_rl_jax import config as cfglib
    from teams_rl_jax.errors import ConfigError
    from teams_rl_jax.experiment.config import ExperimentConfig
    from teams_rl_jax.experiment.runner import arm_config

    for name in ("paper_llama2_7b_gpu.yaml", "paper_llama2_7b_tpu.yaml"):
        cfg = cfglib.load(ExperimentConfig, ROOT / "configs" / name)
        assert cfg.experiment.protocol is None and cfg.arm_protocol == "paper"
        for arm in ("policy", "random", "fixed"):
            assert arm_config(cfg, tmp_path, arm, 100, cfg.roles).generate.protocol == "paper"
        assert arm_config(cfg, tmp_path, "wizardlm", None, cfg.roles).generate.protocol == "wizardlm"
    with pytest.raises(ConfigError, match="generate.protocol: 'wizardlm' cannot be the arms' protocol"):
        cfglib.load(ExperimentConfig, ROOT / "configs" / "paper_llama2_7b_gpu.yaml",
                    ["generate.protocol=wizardlm", "generate.selector=random"])
