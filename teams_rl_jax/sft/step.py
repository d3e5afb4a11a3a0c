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


def float32_moments(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Run ``inner`` on a float32 view of params and gradients: its state (Adam's ``mu`` *and* ``nu``)
    is float32 even when params are bf16, and updates are cast back to each param's dtype.

    Why a wrapper: ``optax.adamw(mu_dtype=...)`` sets only the first moment's dtype; ``nu`` follows the
    params, and a bf16 second moment underflows (1 - b2 = 1e-3 of a small g^2 rounds away).
    """
    def f32(tree):
        return jax.tree_util.tree_map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating)
                                      else x, tree)

    def init(params):
        return inner.init(f32(params))

    def update(updates, state, params=None):
        new, state = inner.update(f32(updates), state, None if params is None else f32(params))
        if params is not None:
            new = jax.tree_util.tree_map(lambda u, p: u.astype(p.dtype), new, params)
        return new, state

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimSection, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the schedule and the no-decay mask on norms/biases.

    ``cfg.moments_dtype``: "float32" (default) keeps clipping and both Adam moments in float32 whatever
    the params' dtype; "param" stores them in the params' dtype (half the optimizer memory with bf16
    params, at the cost of precision).
    """
    parts = []
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    opt = optax.chain(*parts)
    return float32_moments(opt) if cfg.moments_dtype == "float32" else opt


def _head_kernel(lm, params) -> jax.Array:
    """The output projection as ``[D, V]`` (the embedding, transposed, when the head is tied)."""
    if lm.config.tie_word_embeddings:
        return params["embed_tokens"]["embedding"].T
    return params["lm_head"]["kernel"]


def _chunk_stats(h, w, t, wt, compute_dtype):
    """Loss sum and d(loss)/d(logits) of one chunk: ``h [C,D]``, ``w [D,V]``, targets/weights ``[C]``.

    Logits are the compute-dtype product accumulated *and returned* in float32 (never rounded to
    bf16), and the softmax/log-sum-exp are float32 maths.
    """
    logits = jnp.dot(h.astype(compute_dtype), w.astype(compute_dtype), preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    loss = jnp.sum((lse - tgt) * wt)
    dlogits = (jnp.exp(logits - lse[:, None]) - jax.nn.one_hot(t, logits.shape[-1], dtype=jnp.float32)) * wt[:, None]
    return loss, dlogits


def _chunks(h, targets, weights, chunk):
    """Flatten ``[B,T,...]`` to tokens and split into ``n`` chunks of ``chunk`` (zero-weight padding)."""
    D = h.shape[-1]
    h, targets, weights = h.reshape(-1, D), targets.reshape(-1), weights.reshape(-1)
    N = h.shape[0]
    chunk = min(chunk, N)
    pad = -N % chunk
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        targets, weights = jnp.pad(targets, (0, pad)), jnp.pad(weights, (0, pad))
    n = h.shape[0] // chunk
    return h.reshape(n, chunk, D), targets.reshape(n, chunk), weights.reshape(n, chunk), N


# On CPU up to this many chunks are unrolled (no while loop): the loop's per-iteration carry of the
# float32 ``dw`` and its lost scheduling freedom cost ~5% of a 4-chunk SFT step there, and host memory
# is not the constraint. Accelerators (and longer loops) keep the rolled loop, whose peak is one
# chunk's logits: unrolled, XLA keeps the chunks' logits alive together (2 chunks at seq 2048 x vocab
# 32000: 316 instead of 192 MiB).
UNROLL_CHUNKS_ON_CPU = 4


def _unroll(n: int) -> int:
    return n if n <= UNROLL_CHUNKS_ON_CPU and jax.default_backend() == "cpu" else 1


def fused_cross_entropy(h: jax.Array, w: jax.Array, targets: jax.Array, weights: jax.Array, *,
                        chunk: int = 1024) -> jax.Array:
    """``sum(weights * CE(h @ w, targets))`` without ever holding the ``[B,T,V]`` logits.

    ``h [B,T,D]`` (compute dtype), ``w [D,V]``, ``targets``/``weights`` ``[B,T]``. The tokens are
    processed ``chunk`` at a time in a ``lax.scan``. Differentiating it does not recompute the logits
    (as plain remat of the chunk would, +1/3 of the head's FLOPs): a ``custom_vjp`` forward computes
    each chunk's softmax once and turns it straight into the chunk's ``dh`` and its share of ``dw``
    (the "fused linear cross-entropy" of Liger-Kernel/Apple's cut-cross-entropy), so the backward is a
    scaling. Peak extra memory: one chunk's ``[chunk, V]`` float32 logits plus ``dh``/``dw``.
    """
    return _fused_ce(h, w, targets, weights, chunk)


def _ce_value(h, w, targets, weights, chunk):
    hc, tc, wc, _ = _chunks(h, targets, weights, chunk)

    def body(total, xs):
        hh, tt, ww = xs
        logits = jnp.dot(hh.astype(h.dtype), w.astype(h.dtype), preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, tt[:, None], axis=-1)[:, 0]
        return total + jnp.sum((lse - tgt) * ww), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hc, tc, wc), unroll=_unroll(hc.shape[0]))
    return total


def _ce_fwd(h, w, targets, weights, chunk):
    hc, tc, wc, N = _chunks(h, targets, weights, chunk)
    cd = h.dtype

    def body(carry, xs):
        total, dw = carry
        hh, tt, ww = xs
        loss, dlogits = _chunk_stats(hh, w, tt, ww, cd)
        dl = dlogits.astype(cd)
        dh = jnp.dot(dl, w.astype(cd).T, preferred_element_type=jnp.float32)
        dw = dw + jnp.dot(hh.astype(cd).T, dl, preferred_element_type=jnp.float32)
        return (total + loss, dw), dh

    init = (jnp.zeros((), jnp.float32), jnp.zeros(w.shape, jnp.float32))
    (total, dw), dh = jax.lax.scan(body, init, (hc, tc, wc), unroll=_unroll(hc.shape[0]))
    dh = dh.reshape(-1, h.shape[-1])[:N].reshape(h.shape).astype(h.dtype)
    return total, (dh, dw.astype(w.dtype))


def _ce_bwd(chunk, res, g):
    dh, dw = res  # targets and weights are data: no cotangent (None)
    return (g.astype(dh.dtype) * dh, g.astype(dw.dtype) * dw, None, None)


def _fused_ce_primal(h, w, targets, weights, chunk):
    return _ce_value(h, w, targets, weights, chunk)


_fused_ce = jax.custom_vjp(_fused_ce_primal, nondiff_argnums=(4,))
_fused_ce.defvjp(_ce_fwd, _ce_bwd)


def full_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum(weights * CE)`` from materialised ``[B,T,V]`` logits (the reference; ``ce_chunk = 0``)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(ce * weights)


def shifted_targets(batch) -> tuple[jax.Array, jax.Array]:
    """Next-token targets and float32 weights ``[B,T]``: position ``t`` predicts token ``t+1`` when its
    ``loss_mask`` is 1 and it is in the same segment as ``t``."""
    ids, seg, mask = batch["input_ids"], batch["segment_ids"], batch["loss_mask"]
    # Shift the (small, int) targets rather than slice the [B, T, V] logits: the gradient of a logits
    # slice is a zero-padded copy of the whole tensor (on CPU it made the step ~15% slower).
    last = jnp.zeros_like(ids[:, :1])
    targets = jnp.concatenate([ids[:, 1:], last], axis=1)
    weights = jnp.concatenate([mask[:, 1:] * (seg[:, 1:] == seg[:, :-1]), last], axis=1).astype(jnp.float32)
    return targets, weights


def token_losses(lm, params, batch, ce_chunk: int = 1024) -> tuple[jax.Array, jax.Array]:
    """``(sum of next-token cross-entropy over loss tokens, number of loss tokens)`` for a batch.

    Position ``t`` predicts token ``t+1``, which counts when its ``loss_mask`` is 1 and it belongs to
    the same segment as ``t``. Cross-entropy is float32 maths on float32 logits. ``ce_chunk > 0``
    (default) applies the head ``ce_chunk`` tokens at a time (:func:`fused_cross_entropy`, no
    ``[B,T,V]`` array); ``0`` materialises the full logits through the model's own head.
    """
    targets, weights = shifted_targets(batch)
    if ce_chunk:
        # The model up to the final norm (LoRA adapters included when params carry them), then the head.
        if hasattr(lm, "_variables"):
            module, variables, rngs = lm._variables(params)
        else:
            module, variables, rngs = lm.module, {"params": params}, None
        _, h, _ = module.apply(variables, jnp.asarray(batch["input_ids"], jnp.int32),
                               jnp.asarray(batch["segment_ids"], jnp.int32),
                               jnp.asarray(batch["positions"], jnp.int32), skip_logits=True, rngs=rngs)
        return fused_cross_entropy(h, _head_kernel(lm, params), targets, weights, chunk=ce_chunk), jnp.sum(weights)
    logits, _, _ = lm.forward(params, batch["input_ids"], batch["segment_ids"], batch["positions"])
    return full_cross_entropy(logits, targets, weights), jnp.sum(weights)


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
                    schedule: optax.Schedule | None = None, ce_chunk: int = 1024):
    """A pure ``train_step(state, batch) -> (state, metrics)`` (jit it with shardings and donation).

    ``batch`` is a dict of int32 ``[B, T]`` arrays; with ``grad_accum = k`` it is split into k
    micro-batches of ``B/k`` rows (:func:`split_micro_batches`) scanned one after another (activation
    memory of one micro-batch); gradients are accumulated in float32 whatever the param dtype.
    A step whose loss or gradient is non-finite leaves params and optimizer state unchanged (the
    loop then stops with an error), so no NaN ever reaches a checkpoint.
    ``metrics``: ``loss`` (mean over loss tokens), ``grad_norm`` (before clipping), ``loss_tokens``,
    ``tokens`` (non-padding), ``finite``, and ``lr`` (the rate this update used) when ``schedule`` is given.
    ``ce_chunk``: tokens per chunk of the loss head (:func:`token_losses`; 0 = full logits).
    """
    lora_dropout = getattr(lm.lora, "dropout", 0) > 0

    def grads_of(params, micro, frozen, key):
        # LoRA: differentiate the adapters only; the frozen base enters as a constant of the loss.
        model = lm.replace(lora_rng=key) if lora_dropout else lm
        loss = lambda p: token_losses(model, p if frozen is None else {**frozen, **p}, micro, ce_chunk)  # noqa: E731
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
