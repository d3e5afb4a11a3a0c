"""Pure SFT pieces: train state, optimizer, loss, and the jitted train step.

Loss normalisation: the step sums token cross-entropies over *all* loss tokens of the global batch
(every micro-batch of the accumulation, every process) and divides by their total count. So a step
with ``grad_accum = k`` on a batch equals one step on the whole batch, and a multi-process step equals
the single-process one, up to float summation order.
"""

from __future__ import annotations

from typing import Any

import flax.struct as struct
import jax
import jax.numpy as jnp
import optax

from teams_rl_jax.sft.config import OptimSection


@struct.dataclass
class TrainState:
    """Everything a step changes: step count, params, optimizer state, PRNG key data (uint32).

    LoRA: ``params`` holds only the trainable adapters (``{"lora": ...}``) and ``frozen`` the base weights,
    a jit argument the step reads but never differentiates, updates or checkpoints (None otherwise).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    frozen: Any = None


def learning_rate_schedule(cfg: OptimSection, total_steps: int) -> optax.Schedule:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine/linear decay (or constant)."""
    warm = max(cfg.warmup_steps, 0)
    decay_steps = max(total_steps - warm, 1)
    end = cfg.lr * cfg.end_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(cfg.lr / warm, cfg.lr, warm - 1) if warm > 1
                                 else optax.constant_schedule(cfg.lr), decay], [warm])


def decay_mask(params) -> Any:
    """True for weights that get weight decay: matrices (kernels, embeddings), not norms or biases."""
    def leaf(path, x):
        name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
        return name in ("kernel", "embedding", "lora_a", "lora_b")

    return jax.tree_util.tree_map_with_path(leaf, params)


def make_optimizer(cfg: OptimSection, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the schedule and the no-decay mask on norms/biases."""
    parts = []
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)


def token_losses(lm, params, batch) -> tuple[jax.Array, jax.Array]:
    """``(sum of next-token cross-entropy over loss tokens, number of loss tokens)`` for a batch.

    Position ``t`` predicts token ``t+1``, which counts when its ``loss_mask`` is 1 and it belongs to
    the same segment as ``t``. Cross-entropy is computed in float32.
    """
    logits, _, _ = lm.forward(params, batch["input_ids"], batch["segment_ids"], batch["positions"])
    ids, seg, mask = batch["input_ids"], batch["segment_ids"], batch["loss_mask"]
    # Shift the (small, int) targets rather than slice the [B, T, V] logits: the gradient of a logits
    # slice is a zero-padded copy of the whole tensor (on CPU it made the step ~15% slower).
    last = jnp.zeros_like(ids[:, :1])
    targets = jnp.concatenate([ids[:, 1:], last], axis=1)
    weights = jnp.concatenate([mask[:, 1:] * (seg[:, 1:] == seg[:, :-1]), last], axis=1).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(ce * weights), jnp.sum(weights)


def split_micro_batches(batch: dict, k: int) -> dict:
    """``[B, ...]`` arrays -> ``[k, B/k, ...]``; micro-batch ``i`` holds rows ``i, i+k, i+2k, ...``.

    Strided, not contiguous: the batch axis is sharded over devices in contiguous blocks, so with
    ``B / (devices * k)`` whole every device keeps exactly its own rows in every micro-batch and the
    split needs no communication (a contiguous split would put micro-batch 0 on the first devices only).
    """
    if jax.tree_util.tree_leaves(batch)[0].shape[0] % k:
        raise ValueError(f"batch of {jax.tree_util.tree_leaves(batch)[0].shape[0]} rows is not divisible by "
                         f"grad_accum={k}")
    return jax.tree_util.tree_map(lambda x: x.reshape(-1, k, *x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(lm, optimizer: optax.GradientTransformation, grad_accum: int = 1,
                    schedule: optax.Schedule | None = None):
    """A pure ``train_step(state, batch) -> (state, metrics)`` (jit it with shardings and donation).

    ``batch`` is a dict of int32 ``[B, T]`` arrays; with ``grad_accum = k`` it is split into k
    micro-batches of ``B/k`` rows (:func:`split_micro_batches`) scanned one after another (activation
    memory of one micro-batch); gradients are accumulated in float32 whatever the param dtype.
    A step whose loss or gradient is non-finite leaves params and optimizer state unchanged (the
    loop then stops with an error), so no NaN ever reaches a checkpoint.
    ``metrics``: ``loss`` (mean over loss tokens), ``grad_norm`` (before clipping), ``loss_tokens``,
    ``tokens`` (non-padding), ``finite``, and ``lr`` (the rate this update used) when ``schedule`` is given.
    """
    lora_dropout = getattr(lm.lora, "dropout", 0) > 0

    def grads_of(params, micro, frozen, key):
        # LoRA: differentiate the adapters only; the frozen base enters as a constant of the loss.
        model = lm.replace(lora_rng=key) if lora_dropout else lm
        loss = lambda p: token_losses(model, p if frozen is None else {**frozen, **p}, micro)  # noqa: E731
        (total, count), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return total, count, grads

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)  # LoRA dropout masks
        if grad_accum == 1:
            total, count, grads = grads_of(state.params, batch, state.frozen, key)
        else:
            micro = split_micro_batches(batch, grad_accum)

            def body(carry, xs):
                t, c, g = carry
                i, mb = xs
                t2, c2, g2 = grads_of(state.params, mb, state.frozen, jax.random.fold_in(key, i))
                g = jax.tree_util.tree_map(lambda a, b: a + b.astype(jnp.float32), g, g2)
                return (t + t2, c + c2, g), None

            zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
            (total, count, grads), _ = jax.lax.scan(body, init, (jnp.arange(grad_accum), micro))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
        loss = total / denom
        grad_norm = optax.global_norm(grads)
        updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = TrainState(step=state.step + jnp.where(finite, 1, 0), params=keep(new_params, state.params),
                               opt_state=keep(new_opt, state.opt_state), rng=state.rng, frozen=state.frozen)
        tokens = jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)  # non-padding, whole global batch
        metrics = {"loss": loss, "grad_norm": grad_norm, "loss_tokens": count, "tokens": tokens, "finite": finite}
        if schedule is not None:  # optax counts updates from 0, as state.step does
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        return new_state, metrics

    return train_step


def opt_state_shardings(optimizer: optax.GradientTransformation, params, param_shardings, replicated):
    """Shardings for the optimizer state: each moment leaf takes the sharding of the parameter it
    belongs to (matched by its trailing dict-key path and shape); counters are replicated."""
    by_path = {}
    for (path, p), sh in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                             jax.tree_util.tree_leaves(param_shardings)):
        by_path[tuple(k.key for k in path)] = (p.shape, sh)
    abstract = jax.eval_shape(optimizer.init, params)

    def pick(path, leaf):
        keys = []
        for k in reversed(path):
            if not isinstance(k, jax.tree_util.DictKey):
                break
            keys.insert(0, k.key)
        hit = by_path.get(tuple(keys))
        return hit[1] if hit is not None and hit[0] == leaf.shape else replicated

    return jax.tree_util.tree_map_with_path(pick, abstract)


def init_state(lm, optimizer: optax.GradientTransformation, seed: int, opt_shardings=None) -> TrainState:
    """Initial train state for ``lm.params``; ``opt_shardings`` from :func:`opt_state_shardings`.

    Every leaf is committed to its device(s), the step counter and key next to the params (replicated
    over their mesh): a jitted step called with uncommitted inputs returns committed outputs, and the
    second call would then be traced and compiled again.
    """
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(lm.params)
    where = jax.tree_util.tree_leaves(lm.params)[0].sharding
    if isinstance(where, jax.sharding.NamedSharding):
        where = jax.sharding.NamedSharding(where.mesh, jax.sharding.PartitionSpec())
    step = jax.device_put(jnp.zeros((), jnp.int32), where)
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), where)
    state = TrainState(step=step, params=lm.params, opt_state=opt_state, rng=rng)
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, x.sharding), state)
