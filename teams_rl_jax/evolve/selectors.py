"""Who picks each seed's next operation: the trained policy, or a baseline (random, fixed).

Under ``generate.protocol: paper`` the selector is wrapped in :class:`PaperOverrides` (the reference
generator's forced breadth steps) and a sampling selector adds ``add_constraints_bias`` to the
add_constraints logit before it draws (:func:`bias_vector`).

``choose(seed_ids, texts, prev_ops, t) -> op names``. Randomness is keyed per seed and step
(``fold_in(seed, crc32(seed_id), t)``), never by batch position, so a resumed run that batches the
remaining seeds differently makes the same choices (and replays its cached queries).

The policy sees what it saw in training: :func:`observation_env` rebuilds the policy stage's env from
``policy.json`` (its tokenizer, embedding and episode length), and each current instruction *text*
is re-tokenized with that env's tokenizer and described by the env's own ``describe`` /
``observation`` (embedding, one-hot previous action, step fraction). So a policy trained on the
token-edit env can drive an LLM operator, and one trained in the LLM env can drive this stage.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from teams_rl_jax import config as cfglib
from teams_rl_jax.env import factory
from teams_rl_jax.env.environment import EnvState, reference_one_hot
from teams_rl_jax.env.operations import OPERATIONS, REFERENCE_ORDER
from teams_rl_jax.env.seeds import seeds_from_texts
from teams_rl_jax.errors import ConfigError
from teams_rl_jax.rl.baselines import paper_overrides, schedule_ops
from teams_rl_jax.rl.config import PolicyConfig
from teams_rl_jax.rl.stage import load_policy
from teams_rl_jax.rl.train import static_action_mask

STOP = "stop"  # the policy's "end this episode" action, where the env has one


def row_seed(base: int, seed_id: str, t: int) -> int:
    """A 31-bit seed of (run seed, seed id, step): independent of batching. Host-side (crc32), so
    picking operations costs no per-row device dispatch."""
    return zlib.crc32(f"{base}:{seed_id}:{t}".encode()) & 0x7FFFFFFF


def seed_key(base: int, seed_id: str, t: int) -> jax.Array:
    """PRNG key of (run seed, seed id, step)."""
    return jax.random.PRNGKey(row_seed(base, seed_id, t))


def bias_vector(operations: Sequence[str], add_constraints_bias: float) -> np.ndarray:
    """``float32 [A]``: ``add_constraints_bias`` at add_constraints, 0 elsewhere (protocol paper's
    analogue of the reference's +0.7 on its Gaussian sample's add_constraints coordinate)."""
    out = np.zeros(len(operations), np.float32)
    if "add_constraints" in operations:
        out[list(operations).index("add_constraints")] = add_constraints_bias
    return out


class RandomSelector:
    """WizardLM's Evol-Instruct: an operation uniformly at random at every step.

    ``bias`` (``[A]`` logits, protocol paper): draw ``argmax(bias + Gumbel noise)`` instead, i.e. the
    categorical of logits ``bias`` (an untrained policy under the reference generator's bias)."""

    name = "random"

    def __init__(self, seed: int = 0, operations: Sequence[str] = OPERATIONS, bias: np.ndarray | None = None):
        self.seed = seed
        self.operations = tuple(operations)
        self.bias = None if bias is None or not np.any(bias) else np.asarray(bias, np.float64)

    def _one(self, seed_id: str, t: int) -> int:
        rng = np.random.default_rng(row_seed(self.seed, seed_id, t))
        if self.bias is None:
            return int(rng.integers(len(self.operations)))
        return int(np.argmax(self.bias + rng.gumbel(size=len(self.operations))))

    def choose(self, seed_ids: Sequence[str], texts: Sequence[str], prev_ops: Sequence[int], t: int) -> list[str]:
        return [self.operations[self._one(s, t)] for s in seed_ids]


class ScheduleSelector:
    """A fixed per-step schedule: op names (the last repeats) or a named one (``[paper]``: the
    reference generator's forced schedule)."""

    def __init__(self, schedule: Sequence[str], steps: int, name: str = "fixed"):
        self.name = name
        self.ops = schedule_ops(tuple(schedule), steps)
        self.operations = OPERATIONS

    def choose(self, seed_ids, texts, prev_ops, t) -> list[str]:
        return [self.ops[min(t, len(self.ops) - 1)]] * len(seed_ids)


class PaperOverrides:
    """The reference generator's overrides of ``inner``'s choice (``rl.baselines.paper_overrides``):
    breadth at 0-based steps 1 and 4; elsewhere a chosen breadth becomes add_constraints. A ``stop``
    chosen at another step passes through."""

    def __init__(self, inner):
        self.inner, self.name, self.operations = inner, inner.name, tuple(inner.operations)
        missing = [op for op in ("breadth", "add_constraints") if op not in self.operations]
        if missing:
            raise ConfigError(f"generate.protocol: paper forces breadth/add_constraints, but selector "
                              f"{self.name!r} has no {missing[0]!r} action ({', '.join(self.operations)})")

    def choose(self, seed_ids, texts, prev_ops, t) -> list[str]:
        ops = self.inner.choose(seed_ids, texts, prev_ops, t)
        ids = jnp.asarray([self.operations.index(op) for op in ops], jnp.int32)
        return [self.operations[int(a)] for a in np.asarray(paper_overrides(jnp.int32(t), ids, self.operations))]


def observation_env(policy_config: Any, roles: Any = None):
    """``(env, env_params)`` whose observation equals the policy stage's env's (``env.factory.observation_env``:
    the token-edit build of the same settings and buffer tokenizer)."""
    return factory.observation_env(policy_config.env, policy_config.env_config, roles)


class PolicySelector:
    """The policy stage's trained actor, fed the env's own observation of each current text."""

    name = "policy"

    def __init__(self, policy_dir: str | Path, *, roles: Any = None, seed: int = 0, greedy: bool = False,
                 batch: int = 32, add_constraints_bias: float = 0.0):
        network, params, meta = load_policy(policy_dir)
        config = cfglib.from_dict(PolicyConfig, meta["config"])
        self.operations = tuple(meta["operations"])
        self.env, self.env_params = observation_env(config, roles)
        num_actions = int(meta["num_actions"])
        paper_obs = getattr(self.env, "observation_kind", "embedding") == "paper"
        obs_dim = len(REFERENCE_ORDER) if paper_obs else self.env.embedding_size(self.env_params) + num_actions + 1
        if obs_dim != int(meta["obs_dim"]):
            raise ConfigError(f"generate: the rebuilt observation has {obs_dim} features but the policy in "
                              f"{policy_dir} was trained on {meta['obs_dim']}")
        self.seed, self.greedy, self.batch = seed, greedy, batch
        self.params = params
        self.bias = jnp.asarray(bias_vector(self.operations, add_constraints_bias))  # added to the logits
        mask = jnp.asarray(static_action_mask(config, self.operations))
        env, operations = self.env, self.operations
        self.max_len = self.env_params.max_len
        length = float(self.env_params.episode_length)

        def observe(env_params, tokens, lengths, prev, t):
            def one(tok, n, p, tt):
                if paper_obs:  # observation: paper, over the policy's own action list ("stop" included)
                    return reference_one_hot(p, operations)
                state = EnvState(instruction=env.describe(env_params, tok, n), seed=jnp.int32(-1),
                                 domain=jnp.int32(-1), prev_action=p, t=tt, done=jnp.asarray(False))
                if env.num_actions == num_actions:
                    return env.observation(state, env_params)  # the env's own observation code
                prev_hot = jax.nn.one_hot(p, num_actions) * (p >= 0)
                frac = jnp.reshape(tt / length, (1,))
                # env.observation sizes the one-hot by env.num_actions; the policy's action list may
                # be longer (a "stop" action), so assemble it the same way at the policy's width.
                return jnp.concatenate([state.instruction.embedding, prev_hot, frac]).astype(jnp.float32)
            return jax.vmap(one)(tokens, lengths, prev, t)

        def act(net_params, env_params, bias, row_seeds, tokens, lengths, prev, t):
            keys = jax.vmap(jax.random.PRNGKey)(row_seeds)
            obs = observe(env_params, tokens, lengths, prev, t)
            logits = network.apply(net_params, obs, mask, method="logits") + bias
            if greedy:
                return jnp.argmax(logits, -1).astype(jnp.int32), obs
            return jax.vmap(lambda k, lg: jax.random.categorical(k, lg))(keys, logits).astype(jnp.int32), obs

        # Weights and env params are arguments of the jitted function, never baked-in constants.
        self._act = jax.jit(act)
        self._observe = jax.jit(observe)

    def _encode(self, texts: Sequence[str]):
        return seeds_from_texts(list(texts), self.env.tokenizer, self.max_len, on_long="truncate")

    def observations(self, texts: Sequence[str], prev_ops: Sequence[int], t: int) -> np.ndarray:
        """The observation vectors the policy sees (for tests and debugging)."""
        b = self._encode(texts)
        n = len(texts)
        return np.asarray(self._observe(self.env_params, b.tokens, b.lengths, jnp.asarray(prev_ops, jnp.int32),
                                        jnp.full((n,), t, jnp.int32)))

    def choose(self, seed_ids, texts, prev_ops, t) -> list[str]:
        n = len(seed_ids)
        rows = max(self.batch, n)  # fixed row count: one compilation for every batch
        b = self._encode(list(texts) + [texts[0]] * (rows - n))
        keys = jnp.asarray([row_seed(self.seed, s, t) for s in seed_ids] + [0] * (rows - n), jnp.uint32)
        prev = jnp.asarray(list(prev_ops) + [-1] * (rows - n), jnp.int32)
        acts, _ = self._act(self.params, self.env_params, self.bias, keys, b.tokens, b.lengths, prev,
                            jnp.full((rows,), t, jnp.int32))
        return [self.operations[int(a)] for a in np.asarray(acts)[:n]]


def _base_selector(name: str, cfg: Any, run_dir: Path, roles: Any, bias: float):
    if name == "policy":
        path = Path(cfg.policy_dir) if cfg.policy_dir else Path(run_dir) / "policy"
        return PolicySelector(path, roles=roles, seed=cfg.seed, greedy=cfg.greedy, batch=cfg.batch_seeds,
                              add_constraints_bias=bias)
    if name == "random":
        return RandomSelector(cfg.seed, bias=bias_vector(OPERATIONS, bias))
    if name == "fixed":
        return ScheduleSelector(cfg.schedule, cfg.steps, name="fixed")
    raise ConfigError(f"generate: unknown selector {name!r}")


def make_selector(name: str, cfg: Any, run_dir: Path, roles: Any = None):
    """The selector called ``name`` for ``GenerateConfig`` ``cfg``, under ``cfg.protocol``: ``paper``
    adds the add_constraints bias to sampling selectors and applies the reference's overrides."""
    if cfg.protocol != "paper":
        return _base_selector(name, cfg, run_dir, roles, 0.0)
    return PaperOverrides(_base_selector(name, cfg, run_dir, roles, cfg.add_constraints_bias))
