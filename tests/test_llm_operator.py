"""LLM operator and reviewer judge on tiny random Llama models: prompt assembly, shapes, queries, judge math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from teams_rl_jax import generate
from teams_rl_jax.env.assemble import concat_left_padded, cut_at_eos
from teams_rl_jax.env.judge import not_equal_probability, parse_judgement
from teams_rl_jax.env.llm_operator import LLMOperator, LLMOperatorParams
from teams_rl_jax.models import init

TINY = dict(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, eos_token_id=2, bos_token_id=1)


def _random_pieces(rng, B, widths):
    pieces, ref = [], [[] for _ in range(B)]
    for w in widths:
        toks = rng.integers(3, 97, size=(B, w)).astype(np.int32)
        lens = rng.integers(0, w + 1, size=B).astype(np.int32)
        pieces.append((jnp.asarray(toks), jnp.asarray(lens)))
        for b in range(B):
            ref[b] += toks[b, : lens[b]].tolist()
    return pieces, ref


def test_concat_left_padded_matches_python():
    rng = np.random.default_rng()
    pieces, ref = _random_pieces(rng, 6, (4, 7, 3))
    ids, mask = concat_left_padded(pieces, 16)
    for b in range(6):
        n = len(ref[b])
        assert mask[b].sum() == n and (np.asarray(mask[b, 16 - n:]) == 1).all()
        assert np.asarray(ids[b, 16 - n:]).tolist() == ref[b]
        assert (np.asarray(ids[b, : 16 - n]) == 0).all()
    # Too long: the start is cut, the end survives.
    ids, mask = concat_left_padded(pieces, 5)
    for b in range(6):
        assert np.asarray(ids[b])[np.asarray(mask[b]) == 1].tolist() == ref[b][-5:]


def test_cut_at_eos():
    toks = jnp.asarray([[5, 6, 2, 7], [5, 6, 7, 8], [2, 0, 0, 0]])
    out, n = cut_at_eos(toks, jnp.asarray([2]), 3)
    assert n.tolist() == [2, 3, 0]
    assert np.asarray(out).tolist() == [[5, 6, 0], [5, 6, 7], [0, 0, 0]]


def test_llm_operator_end_to_end():
    rng = np.random.default_rng()
    lm = init(TINY, jax.random.key(int(rng.integers(1 << 30))))
    A, L = 6, 10
    prefix = jnp.asarray(rng.integers(3, 97, size=(A, 5)), jnp.int32)
    suffix = jnp.asarray(rng.integers(3, 97, size=(A, 3)), jnp.int32)
    params = LLMOperatorParams(lm.params, prefix, jnp.full((A,), 5, jnp.int32), suffix, jnp.full((A,), 3, jnp.int32))
    op = LLMOperator(lm=lm, max_len=L, max_new_tokens=8, prompt_width=5 + L + 3, eos_ids=(2,), temperature=0.0)
    tokens = jnp.asarray(rng.integers(3, 97, size=(4, L)), jnp.int32)
    lengths = jnp.asarray([10, 4, 7, 1], jnp.int32)
    op_ids = jnp.asarray([0, 5, 2, 3], jnp.int32)
    new, new_len, queries = jax.jit(op.apply)(jax.random.key(0), op_ids, tokens, lengths, params)
    assert new.shape == (4, L) and new_len.shape == (4,) and queries.tolist() == [1.0] * 4
    # Same result as generate on the assembled prompt, cut at EOS.
    ids, mask = op.prompts(op_ids, tokens, lengths, params)
    for b in range(4):
        row = np.asarray(ids[b])[np.asarray(mask[b]) == 1].tolist()
        assert row == np.asarray(prefix[op_ids[b]]).tolist() + np.asarray(tokens[b, : lengths[b]]).tolist() + \
            np.asarray(suffix[op_ids[b]]).tolist()
    out = np.asarray(generate(lm, lm.params, ids, mask, max_new_tokens=8, rng=jax.random.key(0), eos_token_id=2))
    for b in range(4):
        gen = out[b].tolist()
        cut = gen[: gen.index(2)] if 2 in gen else gen
        if cut:
            assert np.asarray(new[b, : new_len[b]]).tolist() == cut[:L]
        else:  # empty rewrite keeps the old instruction
            assert int(new_len[b]) == int(lengths[b])
        assert (np.asarray(new[b, new_len[b]:]) == 0).all()


def test_judge_reward_is_softmax_of_answer_logits():
    rng = np.random.default_rng()
    lm = init(TINY, jax.random.key(int(rng.integers(1 << 30))))
    from teams_rl_jax.env.judge import judge_reward

    ids = jnp.asarray(rng.integers(3, 97, size=(3, 9)), jnp.int32)
    mask = jnp.asarray(np.arange(9)[None, :] >= np.array([[0], [3], [6]]), jnp.int32)
    answers = (11, 42)
    got = jax.jit(lambda p, i, m: judge_reward(lm, p, i, m, answers))(lm.params, ids, mask)
    logits = np.asarray(lm.apply(lm.params, ids, mask), np.float64)[:, -1]
    two = logits[:, list(answers)]
    expect = np.exp(two[:, 1]) / np.exp(two).sum(-1)
    np.testing.assert_allclose(np.asarray(got), expect, atol=1e-6)
    assert np.asarray(not_equal_probability(jnp.zeros((1, 97)), answers)).tolist() == [0.5]


@pytest.mark.parametrize("text,want", [("Not Equal", 1.0), ("equal.", 0.0), (" Not  equal", 1.0),
                                        ("I cannot tell", None), ("They are the same", 0.0)])
def test_parse_judgement(text, want):
    assert parse_judgement(text) == want
