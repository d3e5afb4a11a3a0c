"""The policy stage: train the operation-choosing policy and write its artifacts under ``run/policy/``.

``run_policy_stage(config, run_dir)`` trains ``config.algo`` on ``config.env`` and writes:

* ``checkpoint/`` - the actor-critic params (Orbax), with ``policy.json`` (network shape, operations,
  config) next to it; reload with :func:`load_policy`. Baselines have no params: only ``policy.json``.
* ``curves.jsonl`` - one line per update: return, queries (per role, total, cumulative), budgeted
  cost, Lagrange multiplier, KL, losses, entropy, op histogram; ``curves_<baseline>.jsonl`` for each
  baseline in ``config.baselines()`` (run with the same envs, steps and updates: equal episode budgets).
* ``curves.png`` - return vs cumulative queries (policy and baselines on one axis, so comparisons are
  at equal query budgets), queries per episode, KL and entropy per update.
* ``op_histogram.json`` / ``op_histogram.png`` - operation frequencies (whole run, last update, by
  step in the last update), policy next to baselines.
* ``summary.json`` - final returns and query totals of the policy and each baseline.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from teams_rl_jax import config as cfglib
from teams_rl_jax.env.factory import make
from teams_rl_jax.errors import CheckpointError
from teams_rl_jax.rl import testing  # noqa: F401  (registers the "synthetic" env with env.factory)
from teams_rl_jax.rl.config import OPERATIONS, PolicyConfig
from teams_rl_jax.rl.train import LEARNED, env_operations, init_params, make_network, make_trainer

POLICY_META = "policy.json"
CHECKPOINT_DIR = "checkpoint"


def make_env(config: PolicyConfig, roles: Any = None) -> tuple[Any, Any, Any]:
    """``(env, env_params, seeds)`` for ``config.env`` from the one factory (``env.factory.make``):
    ``"llm"`` builds its instructor and reviewer from ``roles``; ``"synthetic"`` is the test env of
    :mod:`teams_rl_jax.rl.testing`. ``seeds`` is None: each env's seed pool is in its params."""
    env, env_params = make(config.env, config.env_config, roles=roles, seed=config.seed)
    return env, env_params, None


def _baseline_config(config: PolicyConfig, name: str) -> PolicyConfig:
    if name == "random":
        return config.replace(algo="random", compare=())
    return config.replace(algo="fixed", schedule=(name,), compare=())


# ---- checkpoint / resume of the runner state ---------------------------------------------------------
def _flat_metrics(metrics: dict) -> dict[str, np.ndarray]:
    flat, _ = jax.tree_util.tree_flatten_with_path(metrics)
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v) for path, v in flat}


def _nest_metrics(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for name, v in flat.items():
        *head, last = name.split("/")
        d = out
        for h in head:
            d = d.setdefault(h, {})
        d[last] = v
    return out


def _comparable(config: PolicyConfig) -> dict:
    d = cfglib.to_dict(config)
    for k in ("num_updates", "save_every"):  # a resumed run may run longer or save more often
        d.pop(k, None)
    return json.loads(json.dumps(d, sort_keys=True, default=str))


class _StateStore:
    """The runner state every ``save_every`` updates: Orbax (``step_<update>``) + the curves so far.

    The curves (``metrics_<update>.npz``) are written before the Orbax step, which is finalised
    atomically, so the latest finalised step always has its curves: a kill -9 anywhere leaves a
    resumable directory.
    """

    def __init__(self, path: Path, config: PolicyConfig):
        import orbax.checkpoint as ocp

        self.path = path.absolute()
        self.path.mkdir(parents=True, exist_ok=True)
        meta = self.path / "config.json"
        want = _comparable(config)
        if meta.is_file():
            have = json.loads(meta.read_text())
            if have != want:
                key = next(k for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k))
                raise CheckpointError(f"{self.path}: saved by a different policy config (key {key!r} differs); "
                                      "use a new run dir or delete it")
        else:
            meta.write_text(json.dumps(want))
        self.mngr = ocp.CheckpointManager(self.path, options=ocp.CheckpointManagerOptions(max_to_keep=2))

    def latest(self) -> int | None:
        return self.mngr.latest_step()

    def save(self, update: int, rs, metrics: dict) -> None:
        import orbax.checkpoint as ocp

        leaves = {f"{i:04d}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(jax.device_get(rs)))}
        tmp = self.path / f".metrics_{update}.npz"
        with open(tmp, "wb") as f:
            np.savez(f, **_flat_metrics(metrics))
        tmp.replace(self.path / f"metrics_{update}.npz")
        self.mngr.save(update, args=ocp.args.StandardSave(leaves))
        self.mngr.wait_until_finished()

    def restore(self, update: int, like):
        import orbax.checkpoint as ocp

        leaves, treedef = jax.tree_util.tree_flatten(like)
        target = {f"{i:04d}": jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) for i, x in enumerate(leaves)}
        try:
            got = self.mngr.restore(update, args=ocp.args.StandardRestore(target))
            with np.load(self.path / f"metrics_{update}.npz") as z:
                metrics = _nest_metrics({k: z[k] for k in z.files})
        except Exception as e:  # noqa: BLE001 - Orbax raises many types; report one line
            raise CheckpointError(f"{self.path}: cannot restore update {update} ({type(e).__name__}: {e})") from None
        rs = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(got[f"{i:04d}"]) for i in range(len(leaves))])
        return rs, metrics


def _run(config: PolicyConfig, env, env_params, seeds, log: Callable[[str], None], tag: str,
         state_dir: Path | None = None):
    """Train ``config`` (resuming from ``state_dir`` when it holds a saved state); returns
    ``(runner_state, metrics stacked over all updates)``."""
    every = max(1, config.num_updates // 10)

    def on_update(i: int, m: dict) -> None:
        if i % every == 0 or i == config.num_updates - 1:
            log(
                f"[policy:{tag}] update {i + 1}/{config.num_updates} return {float(np.mean(m['return'])):.4f} "
                f"queries {float(np.mean(m['queries_total'])):.2f} kl {float(np.mean(m.get('kl', 0.0))):.4f} "
                f"entropy {float(np.mean(m['entropy'])):.3f}"
            )

    trainer = make_trainer(config, env, on_update=on_update)
    if config.loop == "jit":
        init = jax.jit(trainer.init)
        run = jax.jit(trainer.run, static_argnums=3)
    else:
        init, run = trainer.init, trainer.run
    t0 = time.time()
    rs = init(jax.random.PRNGKey(config.seed), env_params)
    history: list[dict] = []
    done = 0
    store = _StateStore(state_dir, config) if (state_dir is not None and config.save_every) else None
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
            store.save(done, rs, jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *history))
            log(f"[policy:{tag}] saved state at update {done}")
    metrics = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *history)
    log(f"[policy:{tag}] {config.num_updates} updates in {time.time() - t0:.1f}s")
    return rs, metrics


def curve_rows(metrics: dict, config: PolicyConfig, names: list[str]) -> list[dict]:
    """JSON-ready rows (one per update) from stacked ``make_train`` metrics; ``names``: the env's ops."""
    episodes_per_update = config.num_envs
    rows, cum = [], 0.0
    for i in range(len(metrics["return"])):
        q_total = float(metrics["queries_total"][i])
        cum += q_total * episodes_per_update
        row = {
            "update": i + 1,
            "episodes": (i + 1) * episodes_per_update,
            "return": float(metrics["return"][i]),
            "episode_length": float(metrics["episode_length"][i]),
            "queries": {k: float(v[i]) for k, v in metrics["queries"].items()},
            "queries_total": q_total,
            "cumulative_queries": cum,
            "cost": float(metrics["cost"][i]),
            "lagrange": float(metrics["lagrange"][i]),
        }
        for k in ("kl", "policy_loss", "value_loss", "entropy", "linesearch_accepted", "clip_fraction"):
            if k in metrics:
                row[k] = float(metrics[k][i])
        row["op_histogram"] = {n: float(x) for n, x in zip(names, metrics["op_histogram"][i])}
        rows.append(row)
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _histograms(metrics: dict, names: list[str]) -> dict:
    weights = metrics["episode_length"][:, None]
    total = (metrics["op_histogram"] * weights).sum(0) / max(float(weights.sum()), 1e-9)
    return {
        "total": dict(zip(names, map(float, total))),
        "final": dict(zip(names, map(float, metrics["op_histogram"][-1]))),
        "final_by_step": [dict(zip(names, map(float, row))) for row in metrics["op_by_step"][-1]],
    }


def _plot_curves(path: Path, runs: dict[str, list[dict]], budget: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    # An env that charges no queries (token edits) is compared at equal episode counts instead.
    by_queries = any(r["cumulative_queries"] > 0 for rows in runs.values() for r in rows)
    xkey = "cumulative_queries" if by_queries else "episodes"
    for name, rows in runs.items():
        cum = [r[xkey] for r in rows]
        upd = [r["update"] for r in rows]
        style = "-" if name == "policy" else "--"
        axes[0, 0].plot(cum, [r["return"] for r in rows], style, label=name)
        axes[0, 1].plot(upd, [r["queries_total"] for r in rows], style, label=name)
        if name == "policy":
            axes[1, 0].plot(upd, [r.get("kl", 0.0) for r in rows], label="KL")
        axes[1, 1].plot(upd, [r.get("entropy", 0.0) for r in rows], style, label=name)
    axes[0, 0].set(xlabel="cumulative queries" if by_queries else "episodes (no queries charged)",
                   ylabel="mean episode return", title="reward at equal budgets")
    if budget is not None:
        pol = runs["policy"]
        axes[0, 1].plot([r["update"] for r in pol], [r["cost"] for r in pol], ":", label="policy (budgeted roles)")
        axes[0, 1].axhline(budget, color="k", lw=0.8, label="budget")
    axes[0, 1].set(xlabel="update", ylabel="queries / episode", title="cost")
    axes[1, 0].set(xlabel="update", ylabel="mean KL(old || new)", title="policy step size")
    axes[1, 1].set(xlabel="update", ylabel="entropy", title="acting entropy")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_histogram(path: Path, hists: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(hists.values()))["total"])
    x = np.arange(len(names))
    width = 0.8 / max(len(hists), 1)
    fig, ax = plt.subplots(figsize=(10, 4))
    for i, (run, h) in enumerate(hists.items()):
        ax.bar(x + i * width, [h["total"][n] for n in names], width, label=run)
    ax.set_xticks(x + 0.4 - width / 2, names, rotation=20, ha="right")
    ax.set(ylabel="fraction of steps", title="operation histogram (whole run)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_policy(
    path: str | Path,
    config: PolicyConfig,
    params: Any,
    num_actions: int,
    obs_dim: int,
    operations: tuple[str, ...] = OPERATIONS,
) -> None:
    """Write ``policy.json`` and (for learned policies) the Orbax checkpoint of ``params`` to ``path``.

    ``operations`` names the actions in order (the env's ``operations``).
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "algo": config.algo,
        "num_actions": num_actions,
        "obs_dim": obs_dim,
        "hidden_sizes": list(config.hidden_sizes),
        "activation": config.activation,
        "operations": list(operations),
        "config": cfglib.to_dict(config),
    }
    (path / POLICY_META).write_text(json.dumps(meta, indent=2))
    if config.algo in LEARNED:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(path / CHECKPOINT_DIR, jax.device_get(params), force=True)
        ckptr.wait_until_finished()


def load_policy(path: str | Path):
    """``(network, params, meta)`` from a directory written by :func:`save_policy` / the stage.

    ``path`` may be the run dir, ``run/policy`` or the policy dir itself. Raises
    :class:`CheckpointError` when ``policy.json`` or the checkpoint is missing.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    for cand in (path, path / "policy"):
        if (cand / POLICY_META).is_file():
            path = cand
            break
    else:
        raise CheckpointError(f"{path}: no {POLICY_META} (not a policy-stage output)")
    meta = json.loads((path / POLICY_META).read_text())
    if meta["algo"] not in LEARNED:
        raise CheckpointError(f"{path}: algo {meta['algo']!r} is a baseline; it has no network params")
    if not (path / CHECKPOINT_DIR).is_dir():
        raise CheckpointError(f"{path / CHECKPOINT_DIR}: policy checkpoint missing")
    config = cfglib.from_dict(PolicyConfig, meta["config"])
    network = make_network(config, meta["num_actions"])
    target = jax.eval_shape(lambda: init_params(network, jax.random.PRNGKey(0), meta["obs_dim"]))
    try:
        params = ocp.StandardCheckpointer().restore(path / CHECKPOINT_DIR, target)
    except Exception as e:  # noqa: BLE001 - Orbax raises many types; report one line
        raise CheckpointError(f"{path / CHECKPOINT_DIR}: cannot restore policy params ({type(e).__name__}: {e})") from None
    return network, params, meta


def run_policy_stage(
    config: PolicyConfig,
    run_dir: str | Path,
    *,
    env: Any = None,
    env_params: Any = None,
    seeds: Any = None,
    roles: Any = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train the policy (and the ``config.baselines()``) and write ``run_dir/policy/`` artifacts.

    ``env``/``env_params``/``seeds`` override :func:`make_env` (tests, custom envs). ``roles``
    (the pipeline's ``cfg.roles``) supplies the instructor and reviewer of ``env: llm``. With
    ``save_every`` the runner state is saved under ``policy/state`` (baselines: ``state_<name>``) and
    a rerun resumes from it. Returns the summary that is also written to ``summary.json``.
    """
    config.validate()
    if env is None:
        env, env_params, seeds = make_env(config, roles)
    if config.env == "llm" and config.loop == "jit" and getattr(env, "host_roles", ()):
        # A role behind HTTP cannot be compiled into the rollout scan: step the env from Python.
        log(f"[policy] roles {', '.join(env.host_roles)} are remote: using the host-step loop")
        config = config.replace(loop="host", host_rollout="step")
    out = Path(run_dir) / "policy"
    out.mkdir(parents=True, exist_ok=True)
    num_actions = int(env.num_actions)
    obs_dim = int(env.observation_size(env_params))
    names = list(env_operations(env))
    episode_length = getattr(env_params, "episode_length", None)
    if isinstance(episode_length, int) and episode_length != config.num_steps:
        log(f"[policy] note: num_steps {config.num_steps} != env episode_length {episode_length} "
            "(rollouts are cut and bootstrapped, or padded with masked steps)")

    runner_state, metrics = _run(config, env, env_params, seeds, log, config.algo, out / "state")
    rows = {"policy": curve_rows(metrics, config, names)}
    hists = {"policy": _histograms(metrics, names)}
    _write_jsonl(out / "curves.jsonl", rows["policy"])
    save_policy(out, config, runner_state.params, num_actions, obs_dim, tuple(names))

    for name in config.baselines():
        bcfg = _baseline_config(config, name)
        _, bmetrics = _run(bcfg, env, env_params, seeds, log, name, out / f"state_{name}")
        rows[name] = curve_rows(bmetrics, bcfg, names)
        hists[name] = _histograms(bmetrics, names)
        _write_jsonl(out / f"curves_{name}.jsonl", rows[name])

    (out / "op_histogram.json").write_text(json.dumps(hists, indent=2))
    _plot_curves(out / "curves.png", rows, config.queries.budget)
    _plot_histogram(out / "op_histogram.png", hists)

    tail = max(1, config.num_updates // 10)  # final return = mean over the last 10% of updates

    def summarize(r: list[dict]) -> dict:
        return {
            "final_return": float(np.mean([x["return"] for x in r[-tail:]])),
            "mean_return": float(np.mean([x["return"] for x in r])),
            "final_queries_per_episode": float(np.mean([x["queries_total"] for x in r[-tail:]])),
            "total_queries": r[-1]["cumulative_queries"],
            "episodes": r[-1]["episodes"],
        }

    summary = {
        "algo": config.algo,
        "env": config.env,
        "num_updates": config.num_updates,
        "policy": summarize(rows["policy"]),
        "baselines": {name: summarize(rows[name]) for name in config.baselines()},
        "final_lagrange": rows["policy"][-1]["lagrange"],
        "op_histogram_final": hists["policy"]["final"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"[policy] wrote {out}")
    return summary
