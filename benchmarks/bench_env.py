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

``--llm``: the LLM env (``make("llm")``, instructor = a random Llama of ``--llm-size`` parameters,
default ~100M) stepping ``--batch`` envs (default 64 with ``--llm``), two designs in the same run on
the same states and actions, interleaved over ``--repeats`` rounds (order alternating):

* ours: ``env.step_batch``: one left-padded batched instructor generate for all rows of the step;
* before (issue 7, defect 3): ``jax.vmap(env.step_env)``, i.e. one batch-1 generate per env under vmap.

It prints each round's times, the median and best ratio, and the load average before and after.

    python benchmarks/bench_env.py --llm                      # ~100M instructor, 64 envs
    python benchmarks/bench_env.py --llm --llm-size tiny      # a few M params (CPU smoke run)
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


LLM_SIZES = {
    # hidden, layers, heads, kv heads, intermediate: ~100M parameters with a ~4k-word vocabulary
    "100m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                 intermediate_size=2816),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128),
}


def build_llm_env(size: str, max_len: int, max_new_tokens: int, dtype: str, seed: int = 0, attention: str = "xla"):
    """``(env, params, num_params)``: the LLM env with a random Llama instructor of ``size``."""
    from teams_rl_jax.data.tokenizer import build_word_tokenizer
    from teams_rl_jax.env import OPERATIONS, make, operation_templates, phrases, read_seed_records
    from teams_rl_jax.env.llm_operator import LLMOperator
    from teams_rl_jax.models import init

    seeds, _ = read_seed_records(None, "instruction", None)
    texts = list(seeds) + [p + s for p, s in operation_templates(OPERATIONS)]
    texts += [" ".join(v) if isinstance(v, (list, tuple)) else str(v) for v in vars(phrases).values()
              if isinstance(v, (list, tuple, str))]
    tok = build_word_tokenizer(texts, 8192)
    cfg = dict(model_type="llama", vocab_size=len(tok), max_position_embeddings=1024, bos_token_id=1,
               eos_token_id=2, pad_token_id=0, attention_impl=attention, **LLM_SIZES[size])
    lm = init(cfg, jax.random.PRNGKey(seed), dtype)
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(lm.params))
    op, op_params = LLMOperator.create(lm, tok, operation_templates(OPERATIONS), max_len=max_len,
                                       max_new_tokens=max_new_tokens)
    env, params = make("llm", tokenizer=tok, seeds=list(seeds), operator=op, operator_params=op_params,
                       max_len=max_len)
    return env, params, n


def llm_main(args) -> None:
    """Batched step vs vmapped batch-1 steps of the LLM env, interleaved rounds, same inputs."""
    load0 = os.getloadavg()
    env, params, n_params = build_llm_env(args.llm_size, args.max_len, args.max_new_tokens, args.dtype,
                                          attention=args.attention)
    B = args.batch
    _, states = jax.jit(env.reset_batch)(jax.random.split(jax.random.PRNGKey(1), B), params)
    actions = jax.random.randint(jax.random.PRNGKey(2), (B,), 0, env.num_actions)
    key = jax.random.PRNGKey(3)
    batched = jax.jit(env.step_batch)
    vmapped = jax.jit(jax.vmap(env.step_env, in_axes=(0, 0, 0, None)))
    keys = jax.random.split(key, B)
    designs = {"ours: step_batch (one batched generate)": lambda: batched(key, states, actions, params),
               "before: vmap(step_env) (batch-1 generate per env)": lambda: vmapped(keys, states, actions, params)}
    compile_s = {}
    for name, fn in designs.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        compile_s[name] = time.perf_counter() - t0
    times = {name: [] for name in designs}
    names = list(designs)
    for r in range(args.repeats):
        for name in (names if r % 2 == 0 else names[::-1]):  # alternate the order: drift hits both
            t0 = time.perf_counter()
            jax.block_until_ready(designs[name]())
            times[name].append(time.perf_counter() - t0)
    load1 = os.getloadavg()
    ours, before = (np.asarray(times[n]) for n in names)
    ratios = before / ours
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} ({jax.default_backend()}: "
          f"{jax.devices()[0].device_kind}), load average before {load0[0]:.1f} after {load1[0]:.1f}")
    print(f"env: llm, instructor random Llama {n_params / 1e6:.1f}M params ({args.dtype}, {args.attention} attention), "
          f"{B} envs, max_len "
          f"{args.max_len}, max_new_tokens {args.max_new_tokens}, {args.repeats} interleaved rounds")
    print()
    print("| design | median step time | env steps/s | compile |")
    print("|---|---:|---:|---:|")
    for name in names:
        med = float(np.median(times[name]))
        print(f"| {name} | {med * 1e3:,.1f} ms | {B / med:,.1f} | {compile_s[name]:.1f} s |")
    print()
    print("per-round ratio (before / ours):", " ".join(f"{x:.2f}" for x in ratios))
    print(f"speed-up: median {np.median(ratios):.2f}x, best {ratios.max():.2f}x")


def main() -> None:
    """Parse flags, time both designs, print a table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", action="store_true", help="benchmark the LLM env's batched step instead")
    ap.add_argument("--llm-size", choices=sorted(LLM_SIZES), default="100m")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attention", default="xla", help="ModelConfig.attention_impl of the instructor (--llm)")
    ap.add_argument("--batch", type=int, default=None, help="envs in parallel (default 1024; 64 with --llm)")
    ap.add_argument("--episodes", type=int, default=2, help="episodes per jitted call (ours)")
    ap.add_argument("--ref-episodes", type=int, default=20, help="episodes per timed call (reference)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-len", type=int, default=None, help="instruction buffer (default 128; 64 with --llm)")
    args = ap.parse_args()
    if args.llm:
        args.batch = args.batch or 64
        args.max_len = args.max_len or 64
        llm_main(args)
        return
    args.batch = args.batch or 1024
    args.max_len = args.max_len or 128

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
