"""The policy stage: train the operation-choosing policy and write its artifacts under ``run/policy/``.

``run_policy_stage(config, run_dir)`` trains ``config.algo`` on ``config.env`` and writes:

* ``checkpoint/`` - the actor-critic params (Orbax), with ``policy.json`` (network shape, operations,
  config) next to it; reload with :func:`~teams_rl_jax.rl.checkpoint.load_policy`. Baselines have no
  params: only ``policy.json``.
* ``curves.jsonl`` - one line per update: return, queries (per role, total, cumulative), budgeted
  cost, Lagrange multiplier, KL, losses, entropy, op histogram; ``curves_<baseline>.jsonl`` for each
  baseline in ``config.baselines()`` (run with the same envs, steps and updates: equal episode budgets).
* ``curves.png`` - return vs cumulative queries (policy and baselines on one axis, so comparisons are
  at equal query budgets), queries per episode, KL and entropy per update.
* ``op_histogram.json`` / ``op_histogram.png`` - operation frequencies (whole run, last update, by
  step in the last update), policy next to baselines.
* ``summary.json`` - final returns and query totals of the policy and each baseline.

This module drives the stage; the checkpoints are :mod:`~teams_rl_jax.rl.checkpoint`, the curves,
histograms and plots :mod:`~teams_rl_jax.rl.curves`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from teams_rl_jax.env.factory import make
from teams_rl_jax.layout import PolicyDir, RunLayout
from teams_rl_jax.rl import testing  # noqa: F401  (registers the "synthetic" env with env.factory)
from teams_rl_jax.rl.checkpoint import StateStore, load_policy, save_policy
from teams_rl_jax.rl.config import PolicyConfig
from teams_rl_jax.rl.curves import curve_rows, op_histograms, summarize, write_comparison, write_jsonl
from teams_rl_jax.rl.train import env_operations, make_trainer

__all__ = ["load_policy", "make_env", "run_policy_stage", "save_policy"]  # the checkpoint's two re-exported


def make_env(config: PolicyConfig, roles: Any = None, prompts: Any = None) -> tuple[Any, Any, Any]:
    """``(env, env_params, seeds)`` for ``config.env`` from the one factory (``env.factory.make``):
    ``"llm"`` builds its instructor and reviewer from ``roles``; ``"synthetic"`` is the test env of
    :mod:`teams_rl_jax.rl.testing`. ``seeds`` is None: each env's seed pool is in its params.
    ``prompts``: the roles' wording (``roles.prompts.Prompts``; None: ours)."""
    env, env_params = make(config.env, config.env_config, roles=roles, seed=config.seed, prompts=prompts)
    return env, env_params, None


def _baseline_config(config: PolicyConfig, name: str) -> PolicyConfig:
    if name == "random":
        return config.replace(algo="random", compare=())
    return config.replace(algo="fixed", schedule=(name,), compare=())


def _log_progress(config: PolicyConfig, log: Callable[[str], None], tag: str) -> Callable[[int, dict], None]:
    every = max(1, config.num_updates // 10)

    def on_update(i: int, m: dict) -> None:
        if i % every == 0 or i == config.num_updates - 1:
            log(
                f"[policy:{tag}] update {i + 1}/{config.num_updates} return {float(np.mean(m['return'])):.4f} "
                f"queries {float(np.mean(m['queries_total'])):.2f} kl {float(np.mean(m.get('kl', 0.0))):.4f} "
                f"entropy {float(np.mean(m['entropy'])):.3f}"
            )

    return on_update


def _concat(history: list[dict]) -> dict:
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *history)


def _run(config: PolicyConfig, env, env_params, seeds, log: Callable[[str], None], tag: str,
         state_dir: Path | None = None):
    """Train ``config`` (resuming from ``state_dir`` when it holds a saved state); returns
    ``(runner_state, metrics stacked over all updates)``."""
    trainer = make_trainer(config, env, on_update=_log_progress(config, log, tag))
    if config.loop == "jit":
        init = jax.jit(trainer.init)
        run = jax.jit(trainer.run, static_argnums=3)
    else:
        init, run = trainer.init, trainer.run
    t0 = time.time()
    rs = init(jax.random.PRNGKey(config.seed), env_params)
    history: list[dict] = []
    done = 0
    store = StateStore(state_dir, config) if (state_dir is not None and config.save_every) else None
    if store is not None and store.latest() is not None:
        done = min(int(store.latest()), config.num_updates)
        rs, saved = store.restore(store.latest(), rs)
        history.append(jax.tree_util.tree_map(lambda x: x[:done], saved))
        log(f"[policy:{tag}] resumed from update {done} ({store.path})")
    chunk = config.save_every or config.num_updates
    while done < config.num_updates:
        n = min(chunk, config.num_updates - done)
        rs, m = run(rs, env_params, seeds, n)
        history.append(jax.tree_util.tree_map(np.asarray, jax.device_get(m)))
        done += n
        if store is not None:
            store.save(done, rs, _concat(history))
            log(f"[policy:{tag}] saved state at update {done}")
    log(f"[policy:{tag}] {config.num_updates} updates in {time.time() - t0:.1f}s")
    return rs, _concat(history)


def _stage_env(config: PolicyConfig, env, env_params, seeds, roles, log, prompts=None):
    """``(config, env, env_params, seeds)``: the env built unless given, and the host-step loop when a
    role is remote (a role behind HTTP cannot be compiled into the rollout scan)."""
    if env is None:
        env, env_params, seeds = make_env(config, roles, prompts)
    if config.env == "llm" and config.loop == "jit" and getattr(env, "host_roles", ()):
        log(f"[policy] roles {', '.join(env.host_roles)} are remote: using the host-step loop")
        config = config.replace(loop="host", host_rollout="step")
    episode_length = getattr(env_params, "episode_length", None)
    if isinstance(episode_length, int) and episode_length != config.num_steps:
        log(f"[policy] note: num_steps {config.num_steps} != env episode_length {episode_length} "
            "(rollouts are cut and bootstrapped, or padded with masked steps)")
    return config, env, env_params, seeds


def run_policy_stage(
    config: PolicyConfig,
    run_dir: str | Path,
    *,
    env: Any = None,
    env_params: Any = None,
    seeds: Any = None,
    roles: Any = None,
    prompts: Any = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train the policy (and the ``config.baselines()``) and write ``run_dir/policy/`` artifacts.

    ``env``/``env_params``/``seeds`` override :func:`make_env` (tests, custom envs). ``roles``
    (the pipeline's ``cfg.roles``) supplies the instructor and reviewer of ``env: llm``; ``prompts``
    (the pipeline's ``prompts:`` file, loaded) their wording. With
    ``save_every`` the runner state is saved under ``policy/state`` (baselines: ``state_<name>``) and
    a rerun resumes from it. Returns the summary that is also written to ``summary.json``.
    """
    config.validate()
    config, env, env_params, seeds = _stage_env(config, env, env_params, seeds, roles, log, prompts)
    out: PolicyDir = RunLayout(run_dir).policy
    out.root.mkdir(parents=True, exist_ok=True)
    names = list(env_operations(env))

    runner_state, metrics = _run(config, env, env_params, seeds, log, config.algo, out.state())
    rows = {"policy": curve_rows(metrics, config, names)}
    hists = {"policy": op_histograms(metrics, names)}
    write_jsonl(out.curves(), rows["policy"])
    save_policy(out.root, config, runner_state.params, int(env.num_actions), int(env.observation_size(env_params)),
                tuple(names))
    for name in config.baselines():
        bcfg = _baseline_config(config, name)
        _, bmetrics = _run(bcfg, env, env_params, seeds, log, name, out.state(name))
        rows[name] = curve_rows(bmetrics, bcfg, names)
        hists[name] = op_histograms(bmetrics, names)
        write_jsonl(out.curves(name), rows[name])
    write_comparison(out, rows, hists, config.queries.budget)

    summary = {
        "algo": config.algo,
        "env": config.env,
        "num_updates": config.num_updates,
        "policy": summarize(rows["policy"], config.num_updates),
        "baselines": {name: summarize(rows[name], config.num_updates) for name in config.baselines()},
        "final_lagrange": rows["policy"][-1]["lagrange"],
        "op_histogram_final": hists["policy"]["final"],
        # host-side counts of the text roles and of the decoded reviewer: calls, rows, rejected rewrites,
        # unparseable replies, not_equal verdicts
        "roles": env.role_stats() if hasattr(env, "role_stats") else {},
    }
    out.summary.write_text(json.dumps(summary, indent=2))
    log(f"[policy] wrote {out.root}")
    return summary
