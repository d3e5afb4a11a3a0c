"""The pipeline's stages: what each runs, reads and leaves, and when a finished one is skipped or redone.

A stage is complete when its outputs exist and its marker ``.stages/<stage>.json`` was written after
them. The marker records

* ``config``: a fingerprint of the stage's own config: its section and the LLM roles it calls
  (policy: instructor + reviewer on the LLM env; generate: ``evolve.stage.needed_roles``);
* ``inputs``: the digest of each upstream artifact the stage read, as its producer recorded it;
* ``artifacts``: digests of what the stage leaves for later stages, computed once, when written
  (the policy checkpoint, ``data/generated.jsonl`` and the baselines' datasets, the SFT export's
  ``config.json`` + safetensors).

Rerunning a complete stage: with another own config it is an error asking for ``--force`` (an
expensive artifact is never deleted silently); with changed inputs (an earlier stage was redone) its
old outputs are removed and it is redone, with one line saying why; otherwise it is skipped. The
response cache is never removed: a redone stage replays every answer it already paid for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

from teams_rl_jax import config as cfglib
from teams_rl_jax.demo import with_demo_roles
from teams_rl_jax.errors import ConfigError
from teams_rl_jax.eval.stage import run_eval_stage
from teams_rl_jax.eval.tasks import found_tasks, task_files
from teams_rl_jax.evolve import run_generate_stage
from teams_rl_jax.evolve.stage import needed_roles
from teams_rl_jax.layout import STAGES, RunLayout
from teams_rl_jax.rl.stage import run_policy_stage
from teams_rl_jax.roles.prompts import load_prompts
from teams_rl_jax.sft.loop import run_sft_stage

Log = Callable[[str], None]
CHUNK = 1 << 20  # digests stream files in 1 MiB blocks


# ------------------------------------------------------------------------------------------ runners
def _run_policy(cfg: Any, run: RunLayout, log: Log) -> None:
    env_config = dataclasses.replace(cfg.policy.env_config, seeds_path=cfg.seeds)  # the one seed setting
    run_policy_stage(cfg.policy.replace(env_config=env_config), run.root, roles=cfg.roles,
                     prompts=load_prompts(cfg.prompts), log=log)


def _run_generate(cfg: Any, run: RunLayout, log: Log) -> None:
    gen = cfg.generate
    if gen.selector == "policy" and gen.policy_dir is None and not run.policy.meta.is_file():
        raise ConfigError(f"generate: selector 'policy' needs the policy stage's output {run.policy.root} "
                          f"(run the policy stage first, or set generate.selector: random)")
    fp = fingerprint(cfg, "generate")  # before the demo roles: the marker's own fingerprint, for the dataset card
    cfg = with_demo_roles(cfg, run.root)
    run_generate_stage(gen, run.root, cfg.roles, log=log, seeds=cfg.seeds, prompts=load_prompts(cfg.prompts),
                       fingerprint=fp)


def _run_sft(cfg: Any, run: RunLayout, log: Log) -> None:
    run_sft_stage(cfg.sft, run.root, log=log)


def _run_eval(cfg: Any, run: RunLayout, log: Log) -> None:
    run_eval_stage(cfg.eval, run.root, log=log)


RUNNERS: dict[str, Callable[[Any, RunLayout, Log], None]] = {
    "policy": _run_policy, "generate": _run_generate, "sft": _run_sft, "eval": _run_eval}


def outputs(run: RunLayout, stage: str) -> tuple[Path, ...]:
    """What a finished stage leaves; all present + its marker = complete."""
    return {"policy": (run.policy.meta, run.policy.summary),
            "generate": (run.data.records, run.data.summary),
            "sft": (run.sft.hf / "config.json",),
            "eval": (run.eval.report_json,)}[stage]


# ---------------------------------------------------------------------------- artifacts and digests
def _rel(run: RunLayout, path: Path) -> str:
    return path.relative_to(run.root).as_posix()


def _tree(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def _export_files(run: RunLayout) -> list[Path]:
    hf = run.sft.hf
    index = [p for p in (hf / "config.json", hf / "model.safetensors.index.json") if p.is_file()]
    return index + sorted(hf.glob("*.safetensors"))


def _baseline_records(run: RunLayout) -> list[Path]:
    root = run.data.baselines
    names = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    return [p for p in (run.data.baseline(n).records for n in names) if p.is_file()]


def artifact_files(run: RunLayout) -> dict[str, tuple[str, Callable[[], list[Path]]]]:
    """``{artifact (run-dir relative): (producing stage, the files its digest covers)}``.

    The policy: ``policy.json`` + its Orbax checkpoint. The SFT export: ``config.json``, the
    safetensors shards and their index (not the tokenizer files, nor a model card a later step may add).
    """
    return {
        _rel(run, run.policy.checkpoint): ("policy", lambda: [run.policy.meta] + _tree(run.policy.checkpoint)),
        _rel(run, run.data.records): ("generate", lambda: [run.data.records]),
        _rel(run, run.data.baselines): ("generate", lambda: _baseline_records(run)),
        _rel(run, run.sft.hf): ("sft", lambda: _export_files(run)),
    }


def digest(files: Iterable[Path], root: Path) -> str:
    """sha256 over each file's run-dir-relative name, size and bytes (streamed)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            while block := fh.read(CHUNK):
                h.update(block)
    return h.hexdigest()


def produced(run: RunLayout, stage: str) -> dict[str, str]:
    """Digests of the artifacts ``stage`` just wrote (recorded in its marker)."""
    return {key: digest(files(), run.root) for key, (producer, files) in artifact_files(run).items()
            if producer == stage and files()}


# ----------------------------------------------------------------------------- what a stage depends on
def roles_used(cfg: Any, stage: str) -> tuple[str, ...]:
    """The LLM roles whose answers a stage's outputs depend on."""
    if stage == "policy":
        return ("instructor", "reviewer") if cfg.policy.env == "llm" else ()
    if stage == "generate":
        return needed_roles(cfg.generate, cfg.roles)
    return ()


def uses_prompts(cfg: Any, stage: str) -> bool:
    """Whether ``stage`` sends the instructor's or the reviewer's prompts (the ``prompts:`` file's)."""
    if stage == "generate" and cfg.generate.operator_role == "expert":
        return True  # the expert rewrites with the instructor's templates
    return bool({"instructor", "reviewer"} & set(roles_used(cfg, stage)))


def own_config(cfg: Any, stage: str) -> dict:
    """The stage's section, the roles it calls (the offline demo's expert named as such), and the
    top-level ``seeds`` (policy, generate) and ``prompts`` (path and content digest, where the stage
    sends them) when set: unset, they add nothing (fingerprints of runs made before them hold); for
    generate with ``decontaminate`` on, the digest of the benchmark files it filters against."""
    d = cfglib.to_dict(cfg)
    # A role's rate budgets change when answers arrive, not what they are.
    roles = {r: {k: v for k, v in d["roles"][r].items() if k not in ("requests_per_minute", "tokens_per_minute")}
             if isinstance(d["roles"].get(r), dict) else d["roles"].get(r) for r in roles_used(cfg, stage)}
    if stage == "generate" and cfg.offline_demo and roles.get("expert") is None:
        roles["expert"] = "offline demo: tiny random Llama"
    out = {stage: d[stage], "roles": roles}
    if stage == "generate":  # where a worker runs and where its cache lives do not change what is made
        out[stage] = {k: v for k, v in d[stage].items() if k not in ("worker", "cache_dir")}
    if stage in ("policy", "generate") and cfg.seeds is not None:
        out["seeds"] = cfg.seeds
    if cfg.prompts is not None and uses_prompts(cfg, stage):
        out["prompts"] = {"path": cfg.prompts, "sha256": hashlib.sha256(Path(cfg.prompts).read_bytes()).hexdigest()}
    if stage == "generate" and cfg.generate.decontaminate != "off":
        out["decontaminate_benchmarks"] = benchmarks_digest(cfg.generate.decontaminate_benchmarks_dir)
    return out


def benchmarks_digest(data_dir: str) -> str | None:
    """:func:`digest` of the benchmark files decontamination reads under ``data_dir`` (None: no such dir):
    other benchmark content = another generate config (a changed file asks for ``--force``)."""
    root = Path(data_dir)
    if not root.is_dir():
        return None
    files = sorted({f for t in found_tasks(root) for f in task_files(t, root)})
    return digest(files, root)


def input_names(cfg: Any, run: RunLayout, stage: str) -> tuple[str, ...]:
    """Run-dir-relative names of the upstream artifacts ``stage`` reads under ``cfg``."""
    checkpoint, records = _rel(run, run.policy.checkpoint), _rel(run, run.data.records)
    baselines, export = _rel(run, run.data.baselines), _rel(run, run.sft.hf)
    if stage == "generate":
        return (checkpoint,) if cfg.generate.selector == "policy" and cfg.generate.policy_dir is None else ()
    if stage == "sft":
        return (records,) if cfg.sft.data.path == "auto" else ()
    if stage == "eval":
        reads_data = (cfg.eval.report.enabled or (cfg.eval.mia.enabled and cfg.eval.mia.members == "auto")
                      or cfg.eval.benchmarks.data_dir is not None)  # decontamination reads the records
        return ((checkpoint, records, baselines) if reads_data else ()) + \
            ((export,) if cfg.eval.checkpoint == "auto" else ())
    return ()


def read_marker(run: RunLayout, stage: str) -> dict | None:
    p = run.marker(stage)
    return json.loads(p.read_text()) if p.is_file() else None


def current_inputs(cfg: Any, run: RunLayout, stage: str) -> dict[str, str | None]:
    """``{artifact: digest}`` as each producer's marker records it (None: not produced in this run dir)."""
    producers = artifact_files(run)
    out = {}
    for name in input_names(cfg, run, stage):
        marker = read_marker(run, producers[name][0]) or {}
        out[name] = (marker.get("artifacts") or {}).get(name)
    return out


def fingerprint(cfg: Any, stage: str) -> str:
    return hashlib.sha256(json.dumps(own_config(cfg, stage), sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------- decisions
def plan(cfg: Any, run: RunLayout, stage: str) -> tuple[str, str]:
    """``("run" | "skip" | "redo", why)`` for ``stage`` without ``--force``.

    Raises ``ConfigError`` when the stage finished with another own config (needs ``--force``).
    """
    marker = read_marker(run, stage)
    if marker is None or not all(p.exists() for p in outputs(run, stage)):
        return "run", ""
    if marker.get("config") != fingerprint(cfg, stage):
        used = roles_used(cfg, stage)
        what = f"'{stage}' config" + (f" or roles ({', '.join(used)})" if used else "")
        raise ConfigError(f"stage '{stage}' in {run.root} already finished with a different {what}; "
                          f"rerun it with --force (or use a new --run-dir)")
    now, then = current_inputs(cfg, run, stage), marker.get("inputs") or {}
    changed = [k for k in now if now[k] != then.get(k)]
    if changed:
        by = sorted({artifact_files(run)[k][0] for k in changed})
        return "redo", f"{', '.join(changed)} changed since it ran ({', '.join(by)} redone)"
    return "skip", ""


def clear(run: RunLayout, stage: str) -> None:
    """Remove a stage's outputs and marker (the response cache stays)."""
    shutil.rmtree(run.stage_dir(stage), ignore_errors=True)
    run.marker(stage).unlink(missing_ok=True)


def mark_complete(cfg: Any, run: RunLayout, stage: str, inputs: dict[str, str | None]) -> None:
    marker = run.marker(stage)
    marker.parent.mkdir(parents=True, exist_ok=True)
    record = {"stage": stage, "config": fingerprint(cfg, stage), "inputs": inputs, "artifacts": produced(run, stage)}
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    tmp.replace(marker)


def run_stage(cfg: Any, run: RunLayout, stage: str, log: Log, *, force: bool = False, lead: bool = True,
              worker: bool = False, rerun: bool = False) -> str:
    """Skip, run or redo ``stage``; returns what was done (``skipped``, ``ran``, ``redone``, ``forced``).

    ``worker`` (``generate.worker`` mode): a worker never clears the stage (that would delete the other
    workers' shards), and the marker is written by whichever worker leaves the outputs complete.
    ``rerun``: run a complete stage again instead of skipping it, without clearing it (``--worker
    merge``: the merge is idempotent)."""
    action, why = ("redo", "") if force else plan(cfg, run, stage)
    if rerun and action == "skip":
        action = "run"
    if worker and action == "redo":
        raise ConfigError(f"generate.worker: stage '{stage}' in {run.root} must be redone ({why or '--force'}); "
                          f"a worker cannot clear the other workers' shards: redo it once without --worker "
                          f"or use a new --run-dir")
    if action == "skip":
        log(f"[{stage}] complete in {run.root} (skipped; --force reruns it)")
        return "skipped"
    if action == "redo" and why:
        log(f"[{stage}] redoing: {why}")
    if action == "redo" and lead:
        clear(run, stage)
    inputs = current_inputs(cfg, run, stage)
    RUNNERS[stage](cfg, run, log)
    if lead and (not worker or all(p.exists() for p in outputs(run, stage))):
        mark_complete(cfg, run, stage, inputs)
    return "forced" if force else ("redone" if action == "redo" else "ran")


__all__ = ["STAGES", "RUNNERS", "plan", "run_stage", "fingerprint", "own_config", "roles_used", "digest"]
