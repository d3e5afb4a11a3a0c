"""The LLM env end to end with tiny random Llama instructor and reviewer: shapes, masks, query counts."""

import jax
import jax.numpy as jnp
import numpy as np

from teams_rl_jax.data.tokenizer import build_word_tokenizer
from teams_rl_jax.env import OPERATIONS, make, operation_templates, read_seed_records
from teams_rl_jax.env.judge import ANSWERS, JUDGE_INSTRUCTION, judge_prompt, reviewer_term
from teams_rl_jax.env.llm_operator import LLMOperator
from teams_rl_jax.env import phrases
from teams_rl_jax.models import init


def test_llm_env_with_instructor_and_reviewer_runs_vmapped():
    seeds, _ = read_seed_records(None, "instruction", 8)
    texts = list(seeds) + [p + s for p, s in operation_templates(OPERATIONS)] + [JUDGE_INSTRUCTION, *ANSWERS,
                                                                              judge_prompt("a", "b")]
    texts += [" ".join(v) if isinstance(v, (list, tuple)) else str(v) for v in vars(phrases).values()
              if isinstance(v, (list, tuple, str))]
    tok = build_word_tokenizer(texts, 4096)
    cfg = dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1, initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    rng = np.random.default_rng()
    instructor = init(cfg, jax.random.key(int(rng.integers(1 << 30))))
    reviewer = init(cfg, jax.random.key(int(rng.integers(1 << 30))))
    L = 48
    op, op_params = LLMOperator.create(instructor, tok, operation_templates(OPERATIONS), max_len=L, max_new_tokens=12)
    term, term_params = reviewer_term(reviewer, tok)
    env, params = make("llm", tokenizer=tok, seeds=list(seeds), operator=op, operator_params=op_params,
                       reward_terms=[term], term_params={"reviewer": term_params}, max_len=L,
                       reward_weights={"novelty": 1.0, "reviewer": 1.0})
    n_env = 3
    keys = jax.random.split(jax.random.key(0), n_env)
    obs, state = jax.vmap(env.reset, in_axes=(0, None))(keys, params)
    assert obs.shape == (n_env, env.observation_size(params))
    step = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None)))
    for t in range(2):
        actions = jnp.asarray([0, 5, 2][:n_env], jnp.int32)
        obs, state, reward, done, info = step(jax.random.split(jax.random.key(t + 1), n_env), state, actions, params)
        assert reward.shape == (n_env,) and np.isfinite(np.asarray(reward)).all()
        live = ~np.asarray(done) | (t == 0)
        np.testing.assert_array_equal(np.asarray(info["queries"]["instructor"])[live], 1.0)
        np.testing.assert_array_equal(np.asarray(info["queries"]["reviewer"])[live], 1.0)
        judge = np.asarray(info["reward_terms"]["reviewer"])
        assert ((judge >= 0) & (judge <= 1)).all()
        assert (np.asarray(state.instruction.length) <= L).all()
