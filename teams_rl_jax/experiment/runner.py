"""Run the experiment: seed split, the shared policy stage, then each arm's generate -> SFT -> eval.

    <exp>/config.yaml          the resolved experiment config
    <exp>/seed_split.json      member / non-member seed ids (seeded, recorded once, reused on rerun)
    <exp>/cache/               the response cache every arm's generation shares
    <exp>/models/tiny-expert/  the offline demo's expert (shared)
    <exp>/policy/              the policy stage (run once; the policy arm's selector)
    <exp>/arms/<name>/         one run dir per arm (pipeline layout): config.yaml, .stages/, data/
                               (generated.jsonl, members.jsonl, non_members.jsonl), sft/, eval/
    <exp>/report.json|md, roc.png

Each arm's generation writes to its own ``data/`` but runs with the experiment dir as run dir, so the
one cache serves all arms and a killed run replays what it paid. Stage markers are ``teams_rl_jax.stages``'
(a finished arm stage is skipped; a changed arm config asks for ``--force``).
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Callable

from teams_rl_jax import config as cfglib
from teams_rl_jax import stages
from teams_rl_jax.data.seeds import check_seed_file, read_seeds
from teams_rl_jax.demo import with_demo_roles
from teams_rl_jax.errors import ConfigError
from teams_rl_jax.evolve import run_generate_stage
from teams_rl_jax.experiment.config import EQUAL_BUDGET, ExperimentConfig
from teams_rl_jax.experiment.report import write_report
from teams_rl_jax.layout import RunLayout
from teams_rl_jax.roles.prompts import load_prompts
from teams_rl_jax.train_config import TrainConfig

Log = Callable[[str], None]
SPLIT = "seed_split.json"


def arm_dir(root: Path, name: str) -> RunLayout:
    return RunLayout(root / "arms" / name)


def seed_split(cfg: ExperimentConfig, root: Path) -> dict:
    """``{"members": [ids], "non_members": [ids], ...}``: made once (seeded), then read back."""
    path = root / SPLIT
    ex = cfg.experiment
    if path.is_file():
        split = json.loads(path.read_text())
        if (split["member_fraction"], split["split_seed"]) != (ex.member_fraction, ex.split_seed):
            raise ConfigError(f"{path}: the seeds were split with member_fraction {split['member_fraction']}, "
                              f"split_seed {split['split_seed']}; use a new --run-dir to split them otherwise")
        return split
    ids = [s.id for s in read_seeds(cfg.seeds, cfg.generate.max_seeds)]
    random.Random(ex.split_seed).shuffle(ids)
    n = min(max(round(ex.member_fraction * len(ids)), 1), len(ids) - 1)
    split = {"member_fraction": ex.member_fraction, "split_seed": ex.split_seed,
             "members": sorted(ids[:n]), "non_members": sorted(ids[n:])}
    path.write_text(json.dumps(split, indent=1))
    return split


def arm_config(cfg: ExperimentConfig, root: Path, name: str, budget: int | None, roles) -> TrainConfig:
    """The arm's run config: its selector / protocol (and budget), SFT on its members, MIA members vs non-members."""
    lay = arm_dir(root, name)
    g = dict(selector=name, protocol=cfg.arm_protocol, baselines=(), policy_dir=str(root / "policy"))
    if name == "wizardlm":
        g = dict(selector="random", protocol="wizardlm", rounds=cfg.experiment.wizardlm_rounds, baselines=(),
                 policy_dir=None)
    if name in EQUAL_BUDGET:
        g["max_queries"] = budget
    sft = dataclasses.replace(cfg.sft, data=dataclasses.replace(cfg.sft.data, path=str(lay.data.root / "members.jsonl")))
    mia = dataclasses.replace(cfg.eval.mia, members=str(lay.data.root / "members.jsonl"),
                              non_members=str(lay.data.root / "non_members.jsonl"))
    ev = dataclasses.replace(cfg.eval, checkpoint="auto", mia=mia,
                             report=dataclasses.replace(cfg.eval.report, compare=()))
    return cfg.pipeline(run_dir=str(lay.root), stages=("generate", "sft", "eval"), roles=roles,
                           generate=dataclasses.replace(cfg.generate, **g), sft=sft, eval=ev)


def split_records(lay: RunLayout, split: dict) -> None:
    """``data/members.jsonl`` and ``data/non_members.jsonl`` from ``generated.jsonl`` by ``meta.seed_id``."""
    members = set(split["members"])
    mem, non = [], []
    for line in lay.data.records.read_text().splitlines():
        if line.strip():
            (mem if json.loads(line)["meta"]["seed_id"] in members else non).append(line)
    for fname, rows in (("members.jsonl", mem), ("non_members.jsonl", non)):
        (lay.data.root / fname).write_text("".join(r + "\n" for r in rows))


def upstream(root: Path, name: str) -> dict[str, str | None]:
    """What an arm's generation read from outside its run dir: the shared policy stage's checkpoint
    digest (as its marker records it) for the policy arm; nothing for the others."""
    if name != "policy":
        return {}
    exp = RunLayout(root)
    key = exp.policy.checkpoint.relative_to(root).as_posix()
    return {f"experiment:{key}": ((stages.read_marker(exp, "policy") or {}).get("artifacts") or {}).get(key)}


def run_arm(cfg: ExperimentConfig, root: Path, name: str, budget: int | None, roles, split: dict, log: Log,
            force: bool) -> None:
    """Generate (the experiment dir's cache), split by seed, then the pipeline's SFT and eval stages."""
    acfg = arm_config(cfg, root, name, budget, roles)
    lay = RunLayout(acfg.run_dir)
    lay.root.mkdir(parents=True, exist_ok=True)
    cfglib.dump(acfg, lay.config)  # eval reads sft.data (template, max_seq_len) from it
    action, why = ("redo", "") if force else stages.plan(acfg, lay, "generate")
    read = upstream(root, name)
    if action == "skip" and (stages.read_marker(lay, "generate") or {}).get("inputs", {}) != read:
        action, why = "redo", "(the shared policy stage was redone since it ran)"
    if action == "skip":
        log(f"[{name}] generate complete (skipped)")
    else:
        if action == "redo":
            log(f"[{name}] redoing generate {why}".rstrip())
            for s in ("generate", "sft", "eval"):
                stages.clear(lay, s)
        run_generate_stage(acfg.generate, root, acfg.roles, log=log, out_dir=lay.data.root, run_baselines=False,
                           seeds=cfg.seeds, prompts=load_prompts(cfg.prompts))
        split_records(lay, split)
        for s in ("sft", "eval"):  # their inputs are the member / non-member files just rewritten
            stages.clear(lay, s)
        stages.mark_complete(acfg, lay, "generate", read)
    for s in ("sft", "eval"):
        stages.run_stage(acfg, lay, s, lambda m: log(f"[{name}] {m}"), force=force)


def run(cfg: ExperimentConfig, log: Log = print, *, force: bool = False) -> Path:
    """The whole experiment into ``cfg.run_dir``; returns it."""
    cfg.validate()
    check_seed_file(cfg.seeds)
    root = Path(cfg.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    cfglib.dump(cfg, root / "config.yaml")
    split = seed_split(cfg, root)
    log(f"[experiment] seeds: {len(split['members'])} members, {len(split['non_members'])} non-members ({root / SPLIT})")
    arms = cfg.experiment.arms
    for name in arms:  # every arm's generate settings checked before anything runs
        arm_config(cfg, root, name, None, cfg.roles).generate.validate()
    if "policy" in arms:
        stages.run_stage(cfg.pipeline(run_dir=str(root), stages=("policy",)), RunLayout(root), "policy", log, force=force)
    roles = with_demo_roles(cfg.pipeline(run_dir=str(root)), root).roles  # the tiny expert once, in the experiment dir
    budget = None
    for name in sorted(arms, key=lambda a: a != "policy"):  # the policy arm first: it sets the budget
        run_arm(cfg, root, name, budget, roles, split, log, force)
        if name == "policy":
            budget = json.loads(arm_dir(root, "policy").data.summary.read_text())["queries_total"]
    write_report(cfg, root, {a: arm_dir(root, a).root for a in arms}, split, budget, log)
    return root
