"""The policy stage's checkpoints (Orbax): the final policy (:func:`save_policy` / :func:`load_policy`)
and the runner state saved every ``save_every`` updates for resuming (:class:`StateStore`).

A policy dir holds ``policy.json`` (network shape, operations, config) and, for learned policies,
``checkpoint/`` (the actor-critic params); baselines have no params, only ``policy.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from teams_rl_jax import config as cfglib
from teams_rl_jax.errors import CheckpointError
from teams_rl_jax.layout import PolicyDir, RunLayout
from teams_rl_jax.rl.algorithm import init_params, make_network
from teams_rl_jax.rl.config import OPERATIONS, PolicyConfig
from teams_rl_jax.rl.train import LEARNED


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


class StateStore:
    """The runner state every ``save_every`` updates: Orbax (``step_<update>``) + the curves so far.

    The curves (``metrics_<update>.npz``) are written before the Orbax step, which is finalised
    atomically, so the latest finalised step always has its curves: a kill -9 anywhere leaves a
    resumable directory.
    """

    def __init__(self, path: Path, config: PolicyConfig):
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
        leaves = {f"{i:04d}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(jax.device_get(rs)))}
        tmp = self.path / f".metrics_{update}.npz"
        with open(tmp, "wb") as f:
            np.savez(f, **_flat_metrics(metrics))
        tmp.replace(self.path / f"metrics_{update}.npz")
        self.mngr.save(update, args=ocp.args.StandardSave(leaves))
        self.mngr.wait_until_finished()

    def restore(self, update: int, like):
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
    pdir = PolicyDir(Path(path).absolute())
    pdir.root.mkdir(parents=True, exist_ok=True)
    meta = {
        "algo": config.algo,
        "num_actions": num_actions,
        "obs_dim": obs_dim,
        "hidden_sizes": list(config.hidden_sizes),
        "activation": config.activation,
        "operations": list(operations),
        "config": cfglib.to_dict(config),
    }
    pdir.meta.write_text(json.dumps(meta, indent=2))
    if config.algo in LEARNED:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(pdir.checkpoint, jax.device_get(params), force=True)
        ckptr.wait_until_finished()


def _find_policy_dir(path: Path) -> PolicyDir:
    for cand in (PolicyDir(path), RunLayout(path).policy):
        if cand.meta.is_file():
            return cand
    raise CheckpointError(f"{path}: no {PolicyDir(path).meta.name} (not a policy-stage output)")


def load_policy(path: str | Path):
    """``(network, params, meta)`` from a directory written by :func:`save_policy` / the stage.

    ``path`` may be the run dir, ``run/policy`` or the policy dir itself. Raises
    :class:`CheckpointError` when ``policy.json`` or the checkpoint is missing.
    """
    pdir = _find_policy_dir(Path(path).absolute())
    meta = json.loads(pdir.meta.read_text())
    if meta["algo"] not in LEARNED:
        raise CheckpointError(f"{pdir.root}: algo {meta['algo']!r} is a baseline; it has no network params")
    if not pdir.checkpoint.is_dir():
        raise CheckpointError(f"{pdir.checkpoint}: policy checkpoint missing")
    config = cfglib.from_dict(PolicyConfig, meta["config"])
    network = make_network(config, meta["num_actions"])
    target = jax.eval_shape(lambda: init_params(network, jax.random.PRNGKey(0), meta["obs_dim"]))
    try:
        params = ocp.StandardCheckpointer().restore(pdir.checkpoint, target)
    except Exception as e:  # noqa: BLE001 - Orbax raises many types; report one line
        raise CheckpointError(f"{pdir.checkpoint}: cannot restore policy params ({type(e).__name__}: {e})") from None
    return network, params, meta
