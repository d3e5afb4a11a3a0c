"""Stages know their inputs: a stage's marker covers its own section, the roles it calls and the digests of
the upstream artifacts it read (``teams_rl_jax.stages``).

Most tests drive ``train.run`` in-process with the four stage runners replaced by cheap fakes that write
what the real stages leave (each call counts as queries paid); one test runs the real generate, SFT and
eval stages at tiny scale.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from teams_rl_jax import config as cfglib
from teams_rl_jax import stages
from teams_rl_jax.errors import ConfigError, DataError
from teams_rl_jax.layout import RunLayout
from teams_rl_jax.train import TrainConfig, run

ROOT = Path(__file__).resolve().parents[1]


class FakeStages:
    """Runners that leave each stage's outputs, derived only from what the real stage reads.

    ``dataset_follows_policy``: whether generate's records change with the policy checkpoint (they do for a
    real policy; with False a redone policy leaves the same dataset, as a replayed cache can).
    """

    def __init__(self, dataset_follows_policy: bool = True):
        self.calls: list[str] = []
        self.follow = dataset_follows_policy

    def policy(self, cfg, run: RunLayout, log):
        self.calls.append("policy")
        run.policy.checkpoint.mkdir(parents=True, exist_ok=True)
        used = {r: cfglib.to_dict(getattr(cfg.roles, r)) for r in stages.roles_used(cfg, "policy")}
        weights = hashlib.sha256(json.dumps([cfglib.to_dict(cfg.policy), used], sort_keys=True).encode()).hexdigest()
        (run.policy.checkpoint / "params.bin").write_text(weights)
        run.policy.meta.write_text("{}")
        run.policy.summary.write_text("{}")

    def generate(self, cfg, run: RunLayout, log):
        self.calls.append("generate")
        policy = (run.policy.checkpoint / "params.bin").read_text() if self.follow else ""
        run.data.root.mkdir(parents=True, exist_ok=True)
        run.data.records.write_text("".join(json.dumps({"instruction": f"q{cfg.generate.seed}-{i}-{policy[:8]}",
                                                        "output": "a"}) + "\n" for i in range(4)))
        run.data.summary.write_text("{}")

    def sft(self, cfg, run: RunLayout, log):
        self.calls.append("sft")
        run.sft.hf.mkdir(parents=True, exist_ok=True)
        data = run.data.records.read_bytes()
        (run.sft.hf / "config.json").write_text(json.dumps({"lr": cfg.sft.optim.lr}))
        (run.sft.hf / "model.safetensors").write_bytes(hashlib.sha256(data).digest())

    def eval(self, cfg, run: RunLayout, log):
        self.calls.append("eval")
        run.eval.root.mkdir(parents=True, exist_ok=True)
        run.eval.report_json.write_text("{}")

    def install(self, monkeypatch):
        for name in stages.STAGES:
            monkeypatch.setitem(stages.RUNNERS, name, getattr(self, name))
        return self


def _cfg(tmp_path, *overrides: str) -> TrainConfig:
    return cfglib.load(TrainConfig, None, [f"run_dir={tmp_path / 'run'}", "distributed='off'",
                                           "generate.operator_role=token_edit", *overrides])


def _run(cfg, **kw) -> list[str]:
    logs: list[str] = []
    run(cfg, log=logs.append, **kw)
    return logs


LLM_ROLES = ["policy.env=llm", "generate.operator_role=instructor",
             "roles.instructor={backend: openai, base_url: 'http://127.0.0.1:9/v1', model: inst}",
             "roles.reviewer={backend: openai, base_url: 'http://127.0.0.1:9/v1', model: rev}",
             "roles.expert={backend: openai, base_url: 'http://127.0.0.1:9/v1', model: exp}"]


def test_redone_generate_redoes_sft_and_eval(tmp_path, monkeypatch):
    """(a) run; ``--force --stages generate`` with another seed; the whole pipeline with that config: sft and eval
    are redone (one line each saying why), policy and generate skipped.

    Catches: a fingerprint without the upstream dataset's digest (sft/eval stay built on the old dataset).
    """
    fake = FakeStages().install(monkeypatch)
    _run(_cfg(tmp_path))
    assert fake.calls == ["policy", "generate", "sft", "eval"]
    weights = (tmp_path / "run" / "sft" / "hf" / "model.safetensors").read_bytes()
    fake.calls.clear()
    _run(_cfg(tmp_path, "generate.seed=1", "stages=[generate]"), force=True)
    assert fake.calls == ["generate"]
    fake.calls.clear()
    logs = _run(_cfg(tmp_path, "generate.seed=1"))
    assert fake.calls == ["sft", "eval"], logs
    assert "[sft] redoing: data/generated.jsonl changed since it ran (generate redone)" in logs, logs
    assert any(line.startswith("[eval] redoing: ") and "data/generated.jsonl" in line for line in logs), logs
    assert (tmp_path / "run" / "sft" / "hf" / "model.safetensors").read_bytes() != weights  # trained on the new set


@pytest.mark.parametrize("dataset_follows_policy", [True, False])
def test_changed_reviewer_needs_force_then_redoes_what_changed(tmp_path, monkeypatch, dataset_follows_policy):
    """(b) LLM-env policy: a new reviewer stops the run with the ``--force`` error for policy and for generate,
    deleting nothing; with ``--force`` both are redone, then sft only if the dataset changed.

    Catches: a policy fingerprint without the roles it calls (an old policy reused with a new reviewer), a
    stage redone silently on a config change, sft redone although its dataset is byte-identical.
    """
    fake = FakeStages(dataset_follows_policy).install(monkeypatch)
    _run(_cfg(tmp_path, *LLM_ROLES))
    run_dir = tmp_path / "run"
    markers = {s: (run_dir / ".stages" / f"{s}.json").read_text() for s in stages.STAGES}
    fake.calls.clear()
    new_reviewer = [*LLM_ROLES, "roles.reviewer.model=rev2"]
    with pytest.raises(ConfigError, match=r"stage 'policy' .* roles \(instructor, reviewer\); rerun it with --force"):
        _run(_cfg(tmp_path, *new_reviewer))
    with pytest.raises(ConfigError, match=r"stage 'generate' .*rerun it with --force"):
        _run(_cfg(tmp_path, *new_reviewer, "stages=[generate,sft,eval]"))
    assert fake.calls == [] and (run_dir / "policy" / "policy.json").is_file()
    assert {s: (run_dir / ".stages" / f"{s}.json").read_text() for s in stages.STAGES} == markers
    _run(_cfg(tmp_path, *new_reviewer, "stages=[policy,generate]"), force=True)
    assert fake.calls == ["policy", "generate"]
    fake.calls.clear()
    logs = _run(_cfg(tmp_path, *new_reviewer))
    assert fake.calls == (["sft", "eval"] if dataset_follows_policy else ["eval"]), logs  # eval reads policy curves
    assert any(line.startswith("[sft] complete in") for line in logs) != dataset_follows_policy


def test_token_edit_policy_ignores_roles(tmp_path, monkeypatch):
    """The token-edit policy calls no role: a new reviewer does not touch it (generate, which calls the reviewer
    when one is set, asks for --force). Catches: every role in every stage's fingerprint."""
    fake = FakeStages().install(monkeypatch)
    roles = LLM_ROLES[1:]  # token-edit env, LLM generate
    _run(_cfg(tmp_path, *roles))
    fake.calls.clear()
    logs = _run(_cfg(tmp_path, *roles, "roles.reviewer.model=rev2", "stages=[policy]"))
    assert fake.calls == [] and any(line.startswith("[policy] complete in") for line in logs)
    with pytest.raises(ConfigError, match="stage 'generate'"):
        _run(_cfg(tmp_path, *roles, "roles.reviewer.model=rev2"))


def test_nothing_changed_everything_skipped_nothing_rehashed(tmp_path, monkeypatch):
    """(c) an unchanged rerun skips every stage, pays no query and hashes no artifact again.

    Catches: digests recomputed on every run (a 13 GB export re-read), a stage rerun although unchanged.
    """
    fake = FakeStages().install(monkeypatch)
    _run(_cfg(tmp_path, *LLM_ROLES))
    marker = json.loads((tmp_path / "run" / ".stages" / "generate.json").read_text())
    assert set(marker["artifacts"]) == {"data/generated.jsonl"}
    assert len(marker["artifacts"]["data/generated.jsonl"]) == 64
    sft_inputs = json.loads((tmp_path / "run" / ".stages" / "sft.json").read_text())["inputs"]
    assert set(sft_inputs) == {"data/generated.jsonl"}
    fake.calls.clear()
    hashed = []
    monkeypatch.setattr(stages, "digest", lambda files, root: hashed.append(files) or "x")
    logs = _run(_cfg(tmp_path, *LLM_ROLES))
    assert fake.calls == [] and hashed == []
    assert [line.split(" ")[0] for line in logs if "complete in" in line] == [f"[{s}]" for s in stages.STAGES]


def test_export_digest_covers_weights_and_config_only(tmp_path):
    """The SFT export's digest changes with its weights or config.json, not with a model card written later."""
    run = RunLayout(tmp_path)
    run.sft.hf.mkdir(parents=True)
    (run.sft.hf / "config.json").write_text("{}")
    (run.sft.hf / "model-00001-of-00002.safetensors").write_bytes(b"a" * 3_000_000)  # > one streamed block
    (run.sft.hf / "model-00002-of-00002.safetensors").write_bytes(b"b")
    first = stages.produced(run, "sft")["sft/hf"]
    (run.sft.hf / "README.md").write_text("model card")
    (run.sft.hf / "tokenizer.json").write_text("{}")
    assert stages.produced(run, "sft")["sft/hf"] == first
    (run.sft.hf / "model-00002-of-00002.safetensors").write_bytes(b"c")
    assert stages.produced(run, "sft")["sft/hf"] != first
    (run.sft.hf / "model-00002-of-00002.safetensors").write_bytes(b"b")
    (run.sft.hf / "config.json").write_text('{"vocab_size": 3}')
    assert stages.produced(run, "sft")["sft/hf"] != first


def _paid(run_dir) -> int:
    with sqlite3.connect(RunLayout(run_dir).cache) as db:
        return db.execute("select count(*) from responses").fetchone()[0]


REAL = ["stages=[generate,sft,eval]", "offline_demo=true", "generate.selector=random", "generate.max_seeds=8",
        "generate.batch_seeds=8", "generate.steps=2", "generate.baselines=[]", "generate.near_dup_threshold=null",
        "generate.progress=false", "sft.max_steps=2", "sft.global_batch=2",
        "sft.tensorboard=false", "sft.checkpoint.every=2", "eval.mia.max_examples=4", "eval.report.encoder=none",
        "eval.report.compare=[]"]


def test_real_stages_redo_on_new_dataset_and_skip_when_unchanged(tmp_path):
    """The real generate, SFT and eval stages: (a) a regenerated dataset redoes SFT (new weights) and eval;
    (c) an unchanged rerun skips all three and pays no query (the response cache does not grow), although
    eval wrote its results into the SFT export's model card (outside the export's digest).

    Also: the dataset card's config fingerprint is the generate marker's. Mutations tried: ``_run_generate``
    not passing the stage fingerprint (the card gets the generate-section hash); eval not updating the card."""
    run_dir = tmp_path / "run"
    _run(_cfg(tmp_path, *REAL))
    card = RunLayout(run_dir).data.hf.card.read_text()
    assert f"config_fingerprint: {json.loads((run_dir / '.stages' / 'generate.json').read_text())['config']}" in card
    weights = sorted((run_dir / "sft" / "hf").glob("*.safetensors"))[0].read_bytes()
    _run(_cfg(tmp_path, *REAL, "generate.seed=7", "stages=[generate]"), force=True)
    logs = _run(_cfg(tmp_path, *REAL, "generate.seed=7"))
    assert "[sft] redoing: data/generated.jsonl changed since it ran (generate redone)" in logs, logs
    assert any(line.startswith("[eval] redoing: ") for line in logs), logs
    assert sorted((run_dir / "sft" / "hf").glob("*.safetensors"))[0].read_bytes() != weights
    paid = _paid(run_dir)
    assert "membership inference (loss attack" in RunLayout(run_dir).sft.model_card.read_text()  # eval's update
    logs = _run(_cfg(tmp_path, *REAL, "generate.seed=7"))
    assert [line.split(" ")[0] for line in logs if "complete in" in line] == ["[generate]", "[sft]", "[eval]"], logs
    assert _paid(run_dir) == paid


def test_changed_seeds_or_prompts_need_force_for_the_stages_that_use_them(tmp_path, monkeypatch):
    """The top-level ``seeds`` file is in the policy's and generate's fingerprints, the ``prompts`` file (its
    path and content) in those of the stages that send them; sft and eval stay skipped. Catches: either
    setting missing from ``own_config`` (a stage silently skipped on other seeds or wording)."""
    fake = FakeStages().install(monkeypatch)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"instruction": "Name a bird."}\n')
    b.write_text('{"instruction": "Name a fish."}\n')
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text((ROOT / "configs" / "prompts" / "teams_rl_reference.yaml").read_text())
    base = [*LLM_ROLES, f"prompts={prompts}"]
    _run(_cfg(tmp_path, *base, f"seeds={a}"))
    fake.calls.clear()
    for stage in ("policy", "generate"):
        with pytest.raises(ConfigError, match=rf"stage '{stage}' .*rerun it with --force"):
            _run(_cfg(tmp_path, *base, f"seeds={b}", f"stages=[{stage}]"))
    logs = _run(_cfg(tmp_path, *base, f"seeds={b}", "stages=[sft,eval]"))
    assert fake.calls == [] and sum("complete in" in line for line in logs) == 2
    prompts.write_text(prompts.read_text().replace("requirments", "requirements"))  # same path, new wording
    for stage in ("policy", "generate"):
        with pytest.raises(ConfigError, match=rf"stage '{stage}' .*rerun it with --force"):
            _run(_cfg(tmp_path, *base, f"seeds={a}", f"stages=[{stage}]"))
    assert fake.calls == []


def test_missing_seed_file_stops_before_any_stage(tmp_path, monkeypatch):
    """A config's ``seeds`` file that is not there is one line naming it, before any stage runs or the run dir
    is made. Catches: the check dropped (the policy stage would train before generate found no file)."""
    fake = FakeStages().install(monkeypatch)
    missing = tmp_path / "alpaca_data.json"
    with pytest.raises(DataError, match=rf"seeds: seed file not found: {missing}"):
        _run(_cfg(tmp_path, f"seeds={missing}"))
    assert fake.calls == [] and not (tmp_path / "run").exists()
