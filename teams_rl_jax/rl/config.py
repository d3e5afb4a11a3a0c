"""Policy-stage configuration: :class:`PolicyConfig` and its TRPO / PPO / query-budget sub-configs.

Load with ``teams_rl_jax.config.load(PolicyConfig, path, overrides)``; every dataclass validates
itself (``validate()`` raises :class:`~teams_rl_jax.errors.ConfigError`). Defaults follow the TeaMs-RL
reference (TRPO, gamma 0.995, lambda 0.97, max_kl 0.01, damping 0.1, L-BFGS value fit with 25
iterations and L2 1e-3, six-step episodes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from teams_rl_jax.errors import ConfigError

# The six Evol-Instruct operations in the default action order; an env may reorder or subset them
# (``env.operations``), and the baselines map names through the env's own list.
from teams_rl_jax.env.config import EnvConfig
from teams_rl_jax.env.operations import OPERATIONS, STOP  # noqa: E402  (single source of truth)

# Every action name a config may mention: the six operations and ``stop`` (ends the episode).
ACTION_NAMES = OPERATIONS + (STOP,)

# Envs the policy stage builds by name (``env.factory``; "synthetic" is registered by rl.testing).
ENV_NAMES = ("token_edit", "llm", "synthetic")

# Named fixed schedules understood by ``schedule`` (see teams_rl_jax.rl.baselines).
NAMED_SCHEDULES = ("paper", "round_robin")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class TRPOConfig:
    """TRPO as in the reference: CG on Fisher-vector products, backtracking line search, L-BFGS critic."""

    max_kl: float = 0.01
    damping: float = 0.1
    cg_iters: int = 10
    cg_residual_tol: float = 1e-10
    max_backtracks: int = 10
    accept_ratio: float = 0.1
    # The reference's line search only checks improvement; we also reject steps whose mean KL
    # exceeds kl_bound_factor * max_kl (the quadratic KL model can be off for large steps).
    kl_bound_factor: float = 1.5
    value_iters: int = 25
    value_l2: float = 1e-3
    value_memory: int = 10
    # L-BFGS line search: "backtracking" (fixed candidate steps, safe under vmap) or optax's "zoom"
    # (closer to scipy's, but its while_loop hung the XLA CPU runtime under vmap over seeds).
    value_linesearch: Literal["backtracking", "zoom"] = "backtracking"

    def validate(self) -> None:
        """Raise :class:`ConfigError` on an invalid value."""
        _positive("max_kl", self.max_kl)
        if self.damping < 0:
            raise ConfigError(f"damping must be >= 0, got {self.damping}")
        for name in ("cg_iters", "max_backtracks", "value_iters", "value_memory"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.accept_ratio < 0:
            raise ConfigError(f"accept_ratio must be >= 0, got {self.accept_ratio}")
        if self.kl_bound_factor < 1:
            raise ConfigError(f"kl_bound_factor must be >= 1, got {self.kl_bound_factor}")
        if self.value_l2 < 0:
            raise ConfigError(f"value_l2 must be >= 0, got {self.value_l2}")


@dataclass(frozen=True)
class PPOConfig:
    """PPO: clipped surrogate, minibatch epochs, Adam, entropy bonus, (optionally clipped) value loss."""

    lr: float = 3e-4
    anneal_lr: bool = False
    num_epochs: int = 4
    num_minibatches: int = 4
    clip_eps: float = 0.2
    clip_value: bool = True
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5

    def validate(self) -> None:
        """Raise :class:`ConfigError` on an invalid value."""
        _positive("lr", self.lr)
        for name in ("num_epochs", "num_minibatches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        _positive("clip_eps", self.clip_eps)
        if self.ent_coef < 0 or self.vf_coef < 0:
            raise ConfigError("ent_coef and vf_coef must be >= 0")
        _positive("max_grad_norm", self.max_grad_norm)


@dataclass(frozen=True)
class QueryBudgetConfig:
    """Constrained mode: keep expected queries per episode under ``budget`` with a Lagrange multiplier.

    ``budget: null`` (default) disables it. ``roles`` picks the ``info['queries']`` roles that count
    (empty = all). The multiplier is updated by Optax Adam with learning rate ``lr`` (projected to
    ``>= 0``) and penalises the per-step reward as ``r - lambda * queries``.
    """

    budget: float | None = None
    roles: tuple[str, ...] = ()
    lr: float = 0.05
    init: float = 0.0

    def validate(self) -> None:
        """Raise :class:`ConfigError` on an invalid value."""
        if self.budget is not None and self.budget < 0:
            raise ConfigError(f"budget must be >= 0, got {self.budget}")
        _positive("lr", self.lr)
        if self.init < 0:
            raise ConfigError(f"init must be >= 0, got {self.init}")

    @property
    def enabled(self) -> bool:
        """True when a budget is set."""
        return self.budget is not None


@dataclass(frozen=True)
class PolicyConfig:
    """Policy stage: which algorithm, rollout sizes, discounting, network, baselines, query budget.

    Rollouts are episode-aligned: every update resets ``num_envs`` envs and runs ``num_steps`` steps
    (set it to the env's episode length); steps after an episode ends are masked out.

    ``loop="jit"`` makes ``train(key)`` one traceable function (jit it, vmap it over seeds);
    ``loop="host"`` runs the update loop in Python around a jitted update, and ``host_rollout="step"``
    additionally steps the env from Python one jitted step at a time (stopping early once every
    episode is done) for envs whose step is expensive (the LLM env).
    """

    algo: Literal["trpo", "ppo", "random", "fixed"] = "trpo"
    num_envs: int = 16
    num_steps: int = 6
    num_updates: int = 200
    gamma: float = 0.995
    gae_lambda: float = 0.97
    normalize_advantages: bool = True
    hidden_sizes: tuple[int, ...] = (64, 64)
    activation: Literal["tanh", "relu"] = "tanh"
    # Fixed-baseline schedule: one named schedule ("paper", "round_robin") or op names per step
    # (the last one repeats).
    schedule: tuple[str, ...] = ("paper",)
    disabled_ops: tuple[str, ...] = ()
    trpo: TRPOConfig = field(default_factory=TRPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    queries: QueryBudgetConfig = field(default_factory=QueryBudgetConfig)
    loop: Literal["jit", "host"] = "jit"
    host_rollout: Literal["scan", "step"] = "scan"
    seed: int = 0
    # Env used by the policy stage: teams_rl_jax.env.make(env, env_config, roles=roles): "token_edit",
    # "llm" (instructor and reviewer from the pipeline's roles), or "synthetic" (the test env of
    # teams_rl_jax.rl.testing). env_config: the env's typed settings (checked when the config loads).
    env: str = "token_edit"
    env_config: EnvConfig = field(default_factory=EnvConfig)
    # Baselines the stage also runs on the same number of episodes, for the comparison plot. None =
    # ("random", "paper") on the LLM-free envs and none on the LLM env, where each baseline costs as
    # many instructor and reviewer queries as the policy run itself.
    compare: tuple[str, ...] | None = None
    # Save the runner state (params, optimiser, multiplier, key, curves so far) every this many
    # updates (Orbax, run/policy/state); a rerun of the stage resumes from the latest one. 0 = never.
    save_every: int = 0

    def baselines(self) -> tuple[str, ...]:
        """``compare``, or its env-dependent default (see the field)."""
        if self.compare is not None:
            return tuple(self.compare)
        return () if self.env == "llm" else ("random", "paper")

    def validate(self) -> None:
        """Raise :class:`ConfigError` on an invalid value."""
        for name in ("num_envs", "num_steps", "num_updates"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        _unit("gamma", self.gamma)
        _unit("gae_lambda", self.gae_lambda)
        if not self.hidden_sizes or any(h < 1 for h in self.hidden_sizes):
            raise ConfigError(f"hidden_sizes must be positive integers, got {list(self.hidden_sizes)}")
        unknown = [op for op in self.disabled_ops if op not in ACTION_NAMES]
        if unknown:
            raise ConfigError(f"disabled_ops: unknown operation {unknown[0]!r} (valid: {', '.join(ACTION_NAMES)})")
        if len(set(self.disabled_ops) - {STOP}) >= len(OPERATIONS):
            raise ConfigError("disabled_ops disables every operation")
        validate_schedule(self.schedule, "schedule")
        if self.save_every < 0:
            raise ConfigError(f"save_every must be >= 0, got {self.save_every}")
        for name in self.compare or ():
            if name != "random":
                validate_schedule((name,), "compare")
        if self.algo == "ppo":
            batch = self.num_envs * self.num_steps
            if batch % self.ppo.num_minibatches:
                raise ConfigError(
                    f"ppo.num_minibatches ({self.ppo.num_minibatches}) must divide num_envs * num_steps ({batch})"
                )
        if self.host_rollout == "step" and self.loop != "host":
            raise ConfigError("host_rollout='step' needs loop='host'")
        if self.env not in ENV_NAMES:
            raise ConfigError(f"env: unknown env {self.env!r} (valid: {', '.join(ENV_NAMES)})")
        self.trpo.validate()
        self.ppo.validate()
        self.queries.validate()
        self.env_config.validate()

    def replace(self, **changes: Any) -> "PolicyConfig":
        """Copy with fields changed (re-validated)."""
        out = dataclasses.replace(self, **changes)
        out.validate()
        return out


def validate_schedule(schedule: tuple[str, ...], key: str) -> None:
    """A schedule is one named schedule, or a non-empty list of operation names."""
    if not schedule:
        raise ConfigError(f"{key} must not be empty")
    if len(schedule) == 1 and schedule[0] in NAMED_SCHEDULES:
        return
    for op in schedule:
        if op not in ACTION_NAMES:
            raise ConfigError(
                f"{key}: unknown operation or schedule {op!r} "
                f"(valid: {', '.join(NAMED_SCHEDULES + ACTION_NAMES)})"
            )
