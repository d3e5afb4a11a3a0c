"""Token-edit env throughput: vmapped + jitted + ``lax.scan`` rollouts vs one env at a time from Python.

One command, both measured in the same run on the same env (``make("token_edit")``, 48 packaged
seeds, max_len 128, all reward terms and elimination rules on):

    python benchmarks/bench_env.py                    # batch 1024, 6-step episodes
    python benchmarks/bench_env.py --batch 4096 --episodes 4

* ours: ``jit(vmap(reset))`` then ``lax.scan`` of ``vmap(step)`` over the episode (uniform random
  actions drawn inside the scan), ``--episodes`` episodes back to back in one jitted call. Env steps/s
  = batch * episodes * episode_length / time; resets are included in the time.
* reference design: one environment at a time, a Python loop calling the jitted single-env
  ``reset``/``step`` (the per-step host round trip of a gym-style loop), same work per step.

Times are the best of ``--repeats`` runs after a warm-up (compilation excluded): the minimum is the
estimate least disturbed by other load on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np


def _best_time(fn, repeats: int) -> float:
    fn()  # warm-up (compile)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def make_rollout(env, params, batch: int, episodes: int):
    """Jitted ``key -> total reward`` running ``episodes`` episodes of ``batch`` envs."""
    T = params.episode_length

    def episode(total, key):
        k_reset, k_run = jax.random.split(key)
        _, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_reset, batch), params)

        def body(carry, k):
            state, total = carry
            k_act, k_env = jax.random.split(k)
            action = jax.random.randint(k_act, (batch,), 0, env.num_actions)
            _, state, reward, _, _ = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
                jax.random.split(k_env, batch), state, action, params)
            return (state, total + reward.sum()), None

        (state, total), _ = jax.lax.scan(body, (state, total), jax.random.split(k_run, T))
        return total, None

    @jax.jit
    def run(key):
        total, _ = jax.lax.scan(episode, jnp.zeros((), jnp.float32), jax.random.split(key, episodes))
        return total

    return run


def reference_loop(env, params, episodes: int, seed: int = 0) -> float:
    """One env at a time: jitted single-env reset/step called from Python; returns the total reward."""
    reset, step = _single_fns(env)
    rng = np.random.default_rng(seed)
    # Keys made up front as host arrays, so the loop times the env calls, not eager key splitting.
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(seed), episodes * (params.episode_length + 1)))
    total, i = 0.0, 0
    for _ in range(episodes):
        _, state = reset(keys[i], params)
        i += 1
        for _ in range(params.episode_length):
            _, state, reward, done, _ = step(keys[i], state, np.int32(rng.integers(env.num_actions)), params)
            i += 1
            total += float(reward)  # the host reads each reward, as a Python agent loop does
    return total


_SINGLE: dict = {}


def _single_fns(env):
    if id(env) not in _SINGLE:
        _SINGLE[id(env)] = (jax.jit(env.reset), jax.jit(env.step))
    return _SINGLE[id(env)]


def main() -> None:
    """Parse flags, time both designs, print a table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--episodes", type=int, default=2, help="episodes per jitted call (ours)")
    ap.add_argument("--ref-episodes", type=int, default=20, help="episodes per timed call (reference)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-len", type=int, default=128)
    args = ap.parse_args()

    from teams_rl_jax.env import make

    env, params = make("token_edit", max_len=args.max_len)
    T = params.episode_length
    run = make_rollout(env, params, args.batch, args.episodes)
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    jax.block_until_ready(run(key))
    compile_s = time.perf_counter() - t0
    ours = _best_time(lambda: jax.block_until_ready(run(key)), args.repeats)
    ours_sps = args.batch * args.episodes * T / ours
    ref = _best_time(lambda: reference_loop(env, params, args.ref_episodes), max(1, args.repeats // 2))
    ref_sps = args.ref_episodes * T / ref

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} ({jax.default_backend()}), "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"env: token_edit, max_len {params.max_len}, episode length {T}, obs dim {env.observation_size(params)}, "
          f"{len(env.term_names)} reward terms, {len(env.rule_names)} elimination rules")
    print()
    print("| design | envs in parallel | env steps/s | time per env step |")
    print("|---|---:|---:|---:|")
    print(f"| ours: jit + vmap + lax.scan | {args.batch} | {ours_sps:,.0f} | {1e6 / ours_sps:.2f} us |")
    print(f"| reference: Python loop, one env at a time (jitted step) | 1 | {ref_sps:,.0f} | {1e6 / ref_sps:.1f} us |")
    print()
    print(f"speed-up: {ours_sps / ref_sps:,.0f}x   (compile of ours: {compile_s:.1f} s, excluded)")


if __name__ == "__main__":
    main()
