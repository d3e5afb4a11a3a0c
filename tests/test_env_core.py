"""Functional env: determinism, vmap == per-env loop, episode ends, frozen after done, queries, make()."""

import jax
import jax.numpy as jnp
import numpy as np
from helpers import rng as make_rng  # seeded; a failure's report prints the seed
import pytest

from env_helpers import default_env
from teams_rl_jax.env import OPERATIONS, EnvConfig, RewardTerm, make
from teams_rl_jax.errors import ConfigError

N = 6  # envs per batch (small: the tests check semantics, the benchmark checks speed)


@pytest.fixture(scope="module")
def built():
    env, params, f = default_env()
    return env, params, f["reset"], f["step"], f["vreset"], f["vstep"]


def _rollout(built, key, T):
    """N envs, T steps of random actions through the jitted vmapped step: per-step outputs."""
    env, params, _, _, vreset, vstep = built
    k_reset, k_run = jax.random.split(key)
    obs, state = vreset(jax.random.split(k_reset, N), params)
    out = []
    for k in jax.random.split(k_run, T):
        ka, ks = jax.random.split(k)
        a = jax.random.randint(ka, (N,), 0, env.num_actions)
        obs, state, r, d, info = vstep(jax.random.split(ks, N), state, a, params)
        out.append((a, r, state.instruction.tokens, d, obs))
    return [np.stack([np.asarray(o[i]) for o in out]) for i in range(5)]


def test_api_shapes(built):
    env, params, reset, step, _, _ = built
    assert env.num_actions == len(OPERATIONS) == 6
    assert OPERATIONS == ("add_constraints", "deepening", "concretizing", "increase_reasoning_steps",
                          "complicate_input", "breadth")
    obs, state = reset(jax.random.PRNGKey(0), params)
    assert obs.dtype == jnp.float32 and obs.shape == (env.observation_size(params),)
    D = env.embedding_size(params)
    assert np.allclose(obs[D:], 0.0)  # no previous action, step 0
    obs, state, r, d, info = step(jax.random.PRNGKey(1), state, 3, params)
    assert np.asarray(obs[D:D + 6]).tolist() == [0, 0, 0, 1, 0, 0] and np.isclose(obs[-1], 1 / 6)
    assert r.dtype == jnp.float32 and r.shape == () and d.dtype == jnp.bool_
    assert set(info["queries"]) == {"instructor", "reviewer"}
    assert float(info["queries"]["instructor"]) == 0.0 and float(info["queries"]["reviewer"]) == 0.0
    assert set(info["reward_terms"]) == {"novelty", "length_gain", "distinct_gain"}
    assert set(info["eliminated"]) == {"no_gain", "sorry_short", "stopwords_only", "template_copy"}


def test_same_key_same_trajectory(built):
    a = _rollout(built, jax.random.PRNGKey(7), 7)
    b = _rollout(built, jax.random.PRNGKey(7), 7)
    c = _rollout(built, jax.random.PRNGKey(8), 7)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[2], c[2])


def test_vmap_equals_python_loop(built):
    env, params, reset, step, vreset, vstep = built
    rng = make_rng(701)
    keys = jax.random.split(jax.random.PRNGKey(int(rng.integers(1 << 30))), N)
    obs_b, st_b = vreset(keys, params)
    singles = [reset(keys[i], params) for i in range(N)]
    for t in range(7):  # one step past the end: finished episodes must stay put in both paths
        acts = jnp.asarray(rng.integers(0, 6, N), jnp.int32)
        skeys = jax.random.split(jax.random.PRNGKey(int(rng.integers(1 << 30))), N)
        obs_b, st_b, r_b, d_b, info_b = vstep(skeys, st_b, acts, params)
        for i in range(N):
            o, s, r, d, info = step(skeys[i], singles[i][1], acts[i], params)
            singles[i] = (o, s)
            np.testing.assert_array_equal(np.asarray(s.instruction.tokens), np.asarray(st_b.instruction.tokens[i]))
            assert int(s.instruction.length) == int(st_b.instruction.length[i])
            assert bool(d) == bool(d_b[i]) and bool(info["truncated"]) == bool(info_b["truncated"][i])
            np.testing.assert_allclose(float(r), float(r_b[i]), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(np.asarray(o), np.asarray(obs_b[i]), rtol=1e-5, atol=1e-5)


def test_truncated_after_episode_length_then_frozen(built):
    env, params, reset, step = built[:4]
    obs, s = reset(jax.random.PRNGKey(2), params)
    for t in range(params.episode_length):
        obs, s, r, d, info = step(jax.random.PRNGKey(10 + t), s, t % 6, params)
        last = t == params.episode_length - 1
        assert bool(d) == last and bool(info["truncated"]) == last and not bool(info["terminated"])
    frozen = s
    obs2, s2, r2, d2, info2 = step(jax.random.PRNGKey(99), s, 0, params)
    assert float(r2) == 0.0 and bool(d2)
    assert not bool(info2["truncated"]) and not bool(info2["terminated"])  # the end is reported once
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), frozen, s2)


def test_terminated_on_elimination_is_not_truncated(built):
    # Input blocks are 25-45 tokens: after two or three the next one no longer fits the 128-token
    # buffer, the edit changes nothing, fails "no_gain", and with terminate_on_elimination (a traced
    # switch: no recompile) the episode ends early: terminated, not truncated.
    env, params, reset, step = built[:4]
    params = params.replace(terminate_on_elimination=jnp.asarray(True))
    obs, s = reset(jax.random.PRNGKey(0), params)
    ci = OPERATIONS.index("complicate_input")
    ends = []
    for t in range(params.episode_length):
        obs, s, r, d, info = step(jax.random.PRNGKey(t), s, ci, params)
        ends.append((bool(info["terminated"]), bool(info["truncated"]), bool(d), bool(info["eliminated"]["no_gain"])))
        if d:
            break
    assert ends[0] == (False, False, False, False)
    term, trunc, done, no_gain = ends[-1]
    assert term and done and no_gain and not trunc and len(ends) < params.episode_length
    assert float(r) == -1.0  # dropped evolution: terms zeroed, no_gain penalty 1


def test_reset_uses_given_seeds_and_reset_to(built):
    env, params, reset = built[:3]
    from teams_rl_jax.env import seeds_from_texts

    seeds = seeds_from_texts(["Describe a city.", "Explain a game."], env.tokenizer, params.max_len)
    texts = {env.decode_state(reset(jax.random.PRNGKey(k), params, seeds)[1]) for k in range(12)}
    assert texts == {"Describe a city.", "Explain a game."}
    _, s = jax.jit(env.reset_to)(5, params)
    assert int(s.seed) == 5 and env.decode_state(s) == env.decode(params.seeds.tokens[5], params.seeds.lengths[5])


class _FakeOperator:
    """Operator-interface stand-in for the instructor LM: reverses the buffer, 1 query per row."""

    max_len = 128

    def apply(self, key, op_ids, tokens, lengths, params):
        idx = jnp.clip(lengths[:, None] - 1 - jnp.arange(tokens.shape[1])[None, :], 0, tokens.shape[1] - 1)
        rev = jnp.take_along_axis(tokens, idx, axis=1)
        rev = jnp.where(jnp.arange(tokens.shape[1])[None, :] < lengths[:, None], rev, 0)
        return rev, lengths, jnp.ones(op_ids.shape, jnp.float32) * params


def test_llm_hook_and_reviewer_term_queries():
    with pytest.raises(ConfigError, match="needs an instructor operator"):
        make("llm")
    judge = RewardTerm("fake_judge", lambda key, before, after, aux: jnp.full(before.length.shape, aux["params"]),
                       role="reviewer", cost=1.0)
    weights = {"novelty": 1.0, "fake_judge": 2.0}
    env, params = make("llm", operator=_FakeOperator(), operator_params=jnp.float32(1.0), reward_terms=[judge],
                       reward_weights=weights, term_params={"fake_judge": jnp.float32(0.75)})
    obs, s = env.reset(jax.random.PRNGKey(0), params)
    obs, s2, r, d, info = jax.jit(env.step)(jax.random.PRNGKey(1), s, 0, params)
    assert float(info["queries"]["instructor"]) == 1.0 and float(info["queries"]["reviewer"]) == 1.0
    assert float(info["reward_terms"]["fake_judge"]) == 0.75
    np.testing.assert_allclose(float(r), float(info["reward_terms"]["novelty"]) + 1.5, rtol=1e-6)
    n = int(s.instruction.length)
    assert np.asarray(s2.instruction.tokens[:n]).tolist() == np.asarray(s.instruction.tokens[:n])[::-1].tolist()
    assert not bool(info["eliminated"]["no_gain"])
    # The reviewer-role term is the judge: P(Not Equal) < 0.5 = "Equal" = no information gain.
    params = params.replace(term_params={**params.term_params, "fake_judge": jnp.float32(0.25)})
    obs, s3, r, d, info = jax.jit(env.step)(jax.random.PRNGKey(1), s, 0, params)
    assert bool(info["eliminated"]["no_gain"]) and float(r) == -1.0
    np.testing.assert_array_equal(np.asarray(s3.instruction.tokens), np.asarray(s.instruction.tokens))  # dropped


@pytest.mark.parametrize("bad,match", [
    ({"operations": ("add_constraints", "shuffle")}, "unknown operation 'shuffle'"),
    ({"elimination": {"no_gain": -1.0}}, "penalty >= 0"),
    ({"reward_weights": {"nope": 1.0}}, "unknown reward term 'nope'"),
    ({"episode_length": 0}, "episode_length"),
    ({"colour": "red"}, "unknown config key 'env.colour'"),
])
def test_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        make("token_edit", **bad)


def test_config_defaults():
    cfg = EnvConfig()
    cfg.validate()
    assert cfg.episode_length == 6 and cfg.operations == OPERATIONS and cfg.operator == "token_edit"


def test_real_llm_operator_plugs_in():
    """make("llm") with the instructor-LM operator (tiny random Llama): vmapped steps, 1 query per step."""
    from teams_rl_jax.env import offline_tokenizer, operation_templates, read_seed_records
    from teams_rl_jax.env.llm_operator import LLMOperator
    from teams_rl_jax.models import init

    texts, _ = read_seed_records()
    tok = offline_tokenizer(texts)
    lm = init(dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=2, eos_token_id=2, bos_token_id=1), jax.random.key(0))
    op, op_params = LLMOperator.create(lm, tok, operation_templates(OPERATIONS), max_len=64, max_new_tokens=8)
    env, params = make("llm", operator=op, operator_params=op_params, tokenizer=tok, max_len=64)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    obs, s = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))(keys, params)
    obs, s2, r, d, info = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None)))(keys, s, jnp.arange(3), params)
    assert np.asarray(info["queries"]["instructor"]).tolist() == [1.0] * 3
    assert np.isfinite(np.asarray(r)).all() and obs.shape == (3, env.observation_size(params))
    assert all(isinstance(t, str) for t in env.decode_state(s2))
