"""RL for the policy stage: GAE, TRPO, PPO, baselines and the PureJaxRL-shaped ``make_train``.

``make_train(config, env) -> train(key, env_params, seeds=None) -> (runner_state, metrics)``
(env params and seeds are arguments, never closure constants); the shared rollout is
:mod:`~teams_rl_jax.rl.rollout`, each algorithm one file (``trpo``, ``ppo``, ``baselines``).
``run_policy_stage`` (in :mod:`teams_rl_jax.rl.stage`) trains and writes the stage's artifacts;
``load_policy``/``save_policy`` are in :mod:`teams_rl_jax.rl.checkpoint`, the curves and plots in
:mod:`teams_rl_jax.rl.curves`. The three are imported lazily (Orbax), so importing the package stays light.
"""

from teams_rl_jax.rl.baselines import paper_overrides, paper_schedule, schedule_ops, schedule_table
from teams_rl_jax.rl.config import OPERATIONS, PolicyConfig, PPOConfig, QueryBudgetConfig, TRPOConfig
from teams_rl_jax.rl.gae import discounted_returns, gae
from teams_rl_jax.rl.ppo import clipped_surrogate, ppo_update
from teams_rl_jax.rl.algorithm import Algorithm, make_network
from teams_rl_jax.rl.rollout import Transition
from teams_rl_jax.rl.train import RunnerState, make_train, make_trainer, policy_action
from teams_rl_jax.rl.trpo import conjugate_gradient, fisher_vector_product, trpo_update


def __getattr__(name):
    if name == "run_policy_stage":
        from teams_rl_jax.rl import stage

        return stage.run_policy_stage
    if name in ("load_policy", "save_policy"):
        from teams_rl_jax.rl import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'teams_rl_jax.rl' has no attribute {name!r}")


__all__ = [
    "Algorithm",
    "OPERATIONS",
    "PPOConfig",
    "PolicyConfig",
    "QueryBudgetConfig",
    "RunnerState",
    "TRPOConfig",
    "Transition",
    "clipped_surrogate",
    "conjugate_gradient",
    "discounted_returns",
    "fisher_vector_product",
    "gae",
    "load_policy",
    "make_network",
    "make_train",
    "make_trainer",
    "paper_overrides",
    "paper_schedule",
    "policy_action",
    "ppo_update",
    "run_policy_stage",
    "save_policy",
    "schedule_ops",
    "schedule_table",
    "trpo_update",
]
