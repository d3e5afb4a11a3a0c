"""Shared, cached env builds and jitted functions for the env tests (compile once per session)."""

import functools

import jax

from teams_rl_jax.env import make


@functools.lru_cache(maxsize=None)
def default_env():
    """``(env, params, fns)`` for ``make("token_edit")``; ``fns`` holds jitted single and vmapped reset/step."""
    env, params = make("token_edit")
    fns = {
        "reset": jax.jit(env.reset),
        "step": jax.jit(env.step),
        "vreset": jax.jit(jax.vmap(env.reset, in_axes=(0, None))),
        "vstep": jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None))),
        "apply": jax.jit(env.operator.apply),
    }
    return env, params, fns


def decode_rows(env, tokens, lengths):
    """Texts of a batch of buffers."""
    return env.decode(tokens, lengths)
