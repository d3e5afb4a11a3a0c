"""PPO: clipped surrogate, (optionally clipped) value loss, entropy bonus, minibatch epochs with Optax."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from teams_rl_jax.models import policy as P
from teams_rl_jax.rl.algorithm import Algorithm, Batch, actor_critic_batch, init_params
from teams_rl_jax.rl.config import PPOConfig
from teams_rl_jax.rl.gae import masked_mean


def clipped_surrogate(ratio: jax.Array, advantages: jax.Array, clip_eps: float) -> jax.Array:
    """Per-sample PPO objective ``min(r A, clip(r, 1-eps, 1+eps) A)`` (to maximise).

    Outside the trust region on the side that would help (``r > 1+eps`` with ``A > 0``, ``r < 1-eps``
    with ``A < 0``) the clipped term is the minimum and its gradient is exactly zero.
    """
    return jnp.minimum(ratio * advantages, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages)


def make_optimizer(cfg: PPOConfig, num_updates: int) -> optax.GradientTransformation:
    """Global-norm clipping + Adam (eps 1e-5), optionally with a linearly annealed learning rate."""
    lr: Any = cfg.lr
    if cfg.anneal_lr:
        steps = num_updates * cfg.num_epochs * cfg.num_minibatches
        lr = optax.linear_schedule(cfg.lr, 0.0, steps)
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(lr, eps=1e-5))


def ppo_loss(params: Any, network, batch: Batch, cfg: PPOConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss ``-surrogate + vf_coef * value_loss - ent_coef * entropy`` on a (masked) minibatch."""
    logits, values = network.apply(params, batch.obs, batch.action_mask)
    w = batch.weights
    logp = P.log_prob(logits, batch.actions)
    old_logp = P.log_prob(batch.old_logits, batch.actions)
    ratio = jnp.exp(logp - old_logp)
    surrogate = masked_mean(clipped_surrogate(ratio, batch.advantages, cfg.clip_eps), w)

    v_err = jnp.square(values - batch.targets)
    if cfg.clip_value:
        v_clipped = batch.old_values + jnp.clip(values - batch.old_values, -cfg.clip_eps, cfg.clip_eps)
        v_err = jnp.maximum(v_err, jnp.square(v_clipped - batch.targets))
    value_loss = 0.5 * masked_mean(v_err, w)
    ent = masked_mean(P.entropy(logits), w)
    total = -surrogate + cfg.vf_coef * value_loss - cfg.ent_coef * ent
    aux = {
        "policy_loss": -surrogate,
        "value_loss": value_loss,
        "entropy": ent,
        "clip_fraction": masked_mean((jnp.abs(ratio - 1.0) > cfg.clip_eps).astype(jnp.float32), w),
    }
    return total, aux


def ppo_update(
    network,
    params: Any,
    opt_state: Any,
    tx: optax.GradientTransformation,
    batch: Batch,
    key: jax.Array,
    cfg: PPOConfig,
) -> tuple[Any, Any, dict[str, jax.Array]]:
    """``num_epochs`` passes of shuffled minibatch Adam steps over the flat ``batch``.

    Returns ``(params, opt_state, metrics)``; metrics average the minibatch losses and add the exact
    mean KL(old || new) over the batch.
    """
    n = batch.actions.shape[0]
    mb = n // cfg.num_minibatches
    grad_fn = jax.value_and_grad(ppo_loss, has_aux=True)

    def minibatch_step(carry, mb_batch):
        params, opt_state = carry
        (_, aux), grads = grad_fn(params, network, mb_batch, cfg)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), aux

    def epoch(carry, epoch_key):
        perm = jax.random.permutation(epoch_key, n)
        shuffled = jax.tree_util.tree_map(
            lambda x: jnp.take(x, perm, axis=0).reshape((cfg.num_minibatches, mb) + x.shape[1:]), batch
        )
        return jax.lax.scan(minibatch_step, carry, shuffled)

    keys = jax.random.split(key, cfg.num_epochs)
    (params, opt_state), aux = jax.lax.scan(epoch, (params, opt_state), keys)
    metrics = jax.tree_util.tree_map(jnp.mean, aux)
    new_logits = network.apply(params, batch.obs, batch.action_mask, method="logits")
    metrics["kl"] = masked_mean(P.kl_divergence(batch.old_logits, new_logits), batch.weights)
    return params, opt_state, metrics


def make_ppo(config, network):
    """PPO as an :class:`~teams_rl_jax.rl.algorithm.Algorithm` (GAE targets, Adam state carried)."""
    tx = make_optimizer(config.ppo, config.num_updates)

    def init(key, obs_dim):
        params = init_params(network, key, obs_dim)
        return params, tx.init(params)

    def act(params, key, obs, t, mask):
        logits, value = network.apply(params, obs, mask)
        return P.sample(key, logits), logits, value

    def learn(params, opt_state, traj, last, multiplier, key):
        batch = actor_critic_batch(config, network, params, traj, last, multiplier, returns_targets=False)
        return ppo_update(network, params, opt_state, tx, batch, key, config.ppo)

    return Algorithm(init, act, learn)
