"""Remat policies by name give the gradients of no remat; float32 Adam moments for bf16 params."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rng as make_rng
from teams_rl_jax.errors import ConfigError
from teams_rl_jax.models import init
from teams_rl_jax.models.llama import REMAT_POLICIES, remat_policy
from teams_rl_jax.sft.config import OptimSection
from teams_rl_jax.sft.step import make_optimizer, token_losses

TINY = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def test_every_remat_policy_gives_the_same_gradients():
    """Loss gradients under every named policy equal those without remat (float32, 1e-6), and every
    policy but "none" really rematerialises (a remat primitive in the gradient's jaxpr). Catches a
    policy name that silently maps to no remat, and a remat wrapper that changes the maths."""
    rng = make_rng(4, "batch")
    lm = init(TINY, jax.random.key(int(rng.integers(1 << 30))))
    B, T = 2, 16
    ids = rng.integers(3, 64, size=(B, T)).astype(np.int32)
    batch = {"input_ids": ids, "segment_ids": np.ones_like(ids), "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
             "loss_mask": np.ones_like(ids)}

    def grads(policy):
        f = lambda p: token_losses(lm.replace(remat=policy), p, batch)[0]  # noqa: E731
        return jax.jit(jax.grad(f))(lm.params), str(jax.make_jaxpr(jax.grad(f))(lm.params))

    ref, ref_jaxpr = grads("none")
    assert "remat" not in ref_jaxpr and "checkpoint" not in ref_jaxpr
    seen = set()
    for name, policy in REMAT_POLICIES.items():
        if name == "none" or id(policy) in seen:  # "dots" is an alias of a listed policy
            continue
        seen.add(id(policy))
        g, jaxpr = grads(name)
        assert "remat" in jaxpr or "checkpoint" in jaxpr, f"policy {name!r} did not rematerialise"
        for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5, err_msg=name)
    with pytest.raises(ConfigError, match="model.remat"):
        remat_policy("some")


def test_float32_moments_for_bf16_params():
    """With bf16 params, moments_dtype="float32" keeps clipping and both Adam moments (mu and nu) in
    float32, and its bf16 update equals the float32 optimizer's update (on the upcast params) rounded
    once; "param" stores bf16 moments. Catches nu left in bf16 (optax's mu_dtype alone) and an update
    computed in bf16."""
    rng = make_rng(9, "opt")
    params = {"w": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.bfloat16)},
              "n": {"scale": jnp.asarray(rng.normal(size=(4,)), jnp.bfloat16)}}
    grads = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 1e-3, jnp.bfloat16), params)
    cfg = OptimSection(lr=1e-3, warmup_steps=0, weight_decay=0.1)
    opt = make_optimizer(cfg, 10)
    state = opt.init(params)
    floats = [x for x in jax.tree_util.tree_leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    upd, state = opt.update(grads, state, params)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree_util.tree_leaves(upd))
    # Reference: the same optax chain on float32 copies.
    ref_opt = make_optimizer(OptimSection(lr=1e-3, warmup_steps=0, weight_decay=0.1, moments_dtype="param"), 10)
    f32 = lambda t: jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), t)  # noqa: E731
    ref_upd, _ = ref_opt.update(f32(grads), ref_opt.init(f32(params)), f32(params))
    for a, b in zip(jax.tree_util.tree_leaves(upd), jax.tree_util.tree_leaves(ref_upd)):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.bfloat16).astype(jnp.float32)))
    low = make_optimizer(OptimSection(lr=1e-3, warmup_steps=0, moments_dtype="param"), 10).init(params)
    assert any(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(low))
