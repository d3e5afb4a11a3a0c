"""LLM operator on tiny Llama models: prompt assembly in the instructor's chat format, EOS ids (a list,
never the pad id), max_new_tokens and the truncated flag, generated ids landing in the new buffer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rng, seed
from teams_rl_jax import generate
from teams_rl_jax.env import OPERATIONS, operation_templates
from teams_rl_jax.env.assemble import concat_left_padded, cut_at_eos
from teams_rl_jax.env.judge import not_equal_probability
from teams_rl_jax.env.llm_operator import LLMOperator, LLMOperatorParams, operation_piece_ids
from teams_rl_jax.env.prompts import instructor_prompt
from teams_rl_jax.env.seeds import read_seed_records
from teams_rl_jax.errors import ConfigError
from teams_rl_jax.models import init
from tokenizer_fixtures import byte_level_bpe_tokenizer, llama2_spm_tokenizer

TINY = dict(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, eos_token_id=2, bos_token_id=1)


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
    return llama2_spm_tokenizer(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory):
    return byte_level_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


def _random_pieces(r, B, widths):
    pieces, ref = [], [[] for _ in range(B)]
    for w in widths:
        toks = r.integers(3, 97, size=(B, w)).astype(np.int32)
        lens = r.integers(0, w + 1, size=B).astype(np.int32)
        pieces.append((jnp.asarray(toks), jnp.asarray(lens)))
        for b in range(B):
            ref[b] += toks[b, : lens[b]].tolist()
    return pieces, ref


def test_concat_left_padded_matches_python():
    """Catches: a piece dropped or misplaced, padding on the wrong side, the end (not the start) cut."""
    r = rng(11, "concat")
    pieces, ref = _random_pieces(r, 6, (4, 7, 3))
    ids, mask = concat_left_padded(pieces, 16, pad_id=99)
    for b in range(6):
        n = len(ref[b])
        assert mask[b].sum() == n and (np.asarray(mask[b, 16 - n:]) == 1).all()
        assert np.asarray(ids[b, 16 - n:]).tolist() == ref[b]
        assert (np.asarray(ids[b, : 16 - n]) == 99).all()
    # Too long: the start is cut, the end survives.
    ids, mask = concat_left_padded(pieces, 5)
    for b in range(6):
        assert np.asarray(ids[b])[np.asarray(mask[b]) == 1].tolist() == ref[b][-5:]


def test_cut_at_eos_uses_the_eos_list_never_pad():
    """Catches: pad (id 0 = "!" in Llama-3) treated as EOS; only the first of several EOS ids honoured;
    a row without EOS (cut by max_new_tokens) or longer than the buffer not flagged truncated."""
    toks = jnp.asarray([[5, 0, 2, 7], [5, 6, 7, 8], [9, 0, 0, 0], [0, 3, 9, 9], [4, 4, 4, 3]])
    out, n, trunc = cut_at_eos(toks, jnp.asarray([2, 3]), 3, pad_id=0, return_truncated=True)
    assert n.tolist() == [2, 3, 3, 1, 3]
    assert np.asarray(out).tolist() == [[5, 0, 0], [5, 6, 7], [9, 0, 0], [0, 0, 0], [4, 4, 4]]
    # row 1: no EOS; row 2: no EOS (zeros are "!" tokens, not padding); row 4: EOS at 3 = fits exactly.
    assert trunc.tolist() == [False, True, True, False, False]
    out, n, trunc = cut_at_eos(toks, jnp.asarray([2, 3]), 2, pad_id=0, return_truncated=True)
    assert trunc.tolist() == [False, True, True, False, True]  # row 4 needs 3 > 2 slots


def test_llm_operator_end_to_end():
    """Seeded (issue 7: unseeded, it failed 2 of 8 runs when the model emitted the pad id 0).
    Catches: prompt rows not ``prefix[op] + instruction + suffix[op]``; generated ids not copied into
    the new buffer (compared with a direct ``generate`` on the same prompt, cut at the EOS list)."""
    r = rng(7, "operator")
    lm = init(TINY, jax.random.key(seed(7, "init")))
    A, L = 6, 10
    prefix = jnp.asarray(r.integers(3, 97, size=(A, 5)), jnp.int32)
    suffix = jnp.asarray(r.integers(3, 97, size=(A, 3)), jnp.int32)
    params = LLMOperatorParams(lm.params, prefix, jnp.full((A,), 5, jnp.int32), suffix, jnp.full((A,), 3, jnp.int32))
    op = LLMOperator(lm=lm, max_len=L, max_new_tokens=8, prompt_width=5 + L + 3, eos_ids=(2, 3), pad_id=96,
                     temperature=0.0)
    lengths = jnp.asarray([10, 4, 7, 1], jnp.int32)
    tokens = jnp.asarray(np.where(np.arange(L)[None] < np.asarray(lengths)[:, None], r.integers(3, 96, size=(4, L)), 96),
                         jnp.int32)
    op_ids = jnp.asarray([0, 5, 2, 3], jnp.int32)
    # Not wrapped in jax.jit here: generate's own jit is then shared with the direct call below (one
    # compile); the env tests run the operator inside a jitted step.
    res = op.rewrite(jax.random.key(0), op_ids, tokens, lengths, params)
    new, new_len = res.tokens, res.lengths
    assert new.shape == (4, L) and res.queries.tolist() == [1.0] * 4
    ids, mask = op.prompts(op_ids, tokens, lengths, params)
    for b in range(4):
        row = np.asarray(ids[b])[np.asarray(mask[b]) == 1].tolist()
        assert row == np.asarray(prefix[op_ids[b]]).tolist() + np.asarray(tokens[b, : lengths[b]]).tolist() + \
            np.asarray(suffix[op_ids[b]]).tolist()
    out = np.asarray(generate(lm, lm.params, ids, mask, max_new_tokens=8, rng=jax.random.key(0), eos_token_id=[2, 3],
                              pad_token_id=96))
    for b in range(4):
        gen = out[b].tolist()
        stops = [i for i, t in enumerate(gen) if t in (2, 3)]
        cut = gen[: stops[0]] if stops else gen
        if cut:
            assert np.asarray(new[b, : new_len[b]]).tolist() == cut[:L], (b, gen)
        else:  # empty rewrite keeps the old instruction
            assert int(new_len[b]) == int(lengths[b])
        assert (np.asarray(new[b, new_len[b]:]) == 96).all()
        assert bool(res.truncated[b]) == (not stops or stops[0] > L)
    # The 3-tuple interface (what the env calls) agrees with rewrite(), truncated rows kept as they were.
    t3 = op.apply(jax.random.key(0), op_ids, tokens, lengths, params)
    tr = np.asarray(res.truncated)
    assert np.array_equal(np.asarray(t3[0]), np.where(tr[:, None], np.asarray(tokens), np.asarray(new)))
    assert np.array_equal(np.asarray(t3[1]), np.where(tr, np.asarray(lengths), np.asarray(new_len)))


def _chain_lm(vocab, chain, eos, hidden=64):
    """A Llama whose greedy next token depends only on the last token: ``chain[t] = next``.

    Attention and MLP outputs are zeroed (o_proj = down_proj = 0), so the final hidden state is the
    last token's embedding, a one-hot vector; lm_head row ``d`` puts logit ``+8`` (after RMSNorm) on
    the successor and 0 elsewhere - a margin no float rounding can flip. Every token not in ``chain``
    shares dimension 0, whose successor is ``eos``.
    """
    cfg = dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
               num_attention_heads=1, num_key_value_heads=1, initializer_range=0.02, eos_token_id=eos, bos_token_id=1)
    lm = init(cfg, jax.random.key(seed(3, "chain_init")))
    p = jax.tree.map(np.array, lm.params)
    assert len(chain) < hidden
    dims = {t: i + 1 for i, t in enumerate(chain)}
    emb = np.zeros((vocab, hidden), np.float32)
    emb[:, 0] = 1.0
    head = np.zeros((hidden, vocab), np.float32)
    head[0, eos] = 1.0
    for t, d in dims.items():
        emb[t] = 0.0
        emb[t, d] = 1.0
        head[d, chain[t]] = 1.0
    p["embed_tokens"]["embedding"] = emb
    p["lm_head"]["kernel"] = head
    p["layers"]["self_attn"]["o_proj"]["kernel"][:] = 0.0
    p["layers"]["mlp"]["down_proj"]["kernel"][:] = 0.0
    return lm.replace(params=jax.tree.map(jnp.asarray, p))


def _no_pad_copy(tok):
    """The fixture tokenizer without a pad token, like Llama-3 (which ships none)."""
    import copy

    t = copy.deepcopy(tok)
    t.pad_token = None
    assert t.pad_token_id is None
    return t


def test_rewrite_keeps_id0_and_stops_at_every_eos(bpe_tok):
    """A model emitting id 0 ("!" in the byte-level vocabulary, as in Llama-3) keeps it in the rewrite,
    and the second EOS id (``<|end_of_text|>``, from generation_config.json) ends the rewrite.

    Fails on the code before the fix: a tokenizer without a pad token gave pad_id 0, ``cut_at_eos``
    treated pad as EOS, so the rewrite was cut at its first token and the old instruction kept; and
    only the model config's single EOS id was honoured.
    """
    tok = _no_pad_copy(bpe_tok)
    eot, eot2 = tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>")
    pairs = [t.pieces for t in operation_piece_ids(tok, operation_templates(OPERATIONS))]
    last = {s[-1] for _, s in pairs}
    a, b = [i for i in range(200, 400) if i not in last][:2]
    chain = {s: 0 for s in last}
    chain.update({0: a, a: b, b: eot2})
    lm = _chain_lm(len(tok), chain, eos=eot)
    texts, _ = read_seed_records()
    L = 24
    op, params = LLMOperator.create(lm, tok, operation_templates(OPERATIONS), max_len=L, max_new_tokens=6,
                                    temperature=0.0)
    assert op.pad_id not in op.eos_ids and set(op.eos_ids) == {eot, eot2}, (op.pad_id, op.eos_ids)
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts[:3]]
    buf = np.full((3, L), op.pad_id, np.int32)
    for i, row in enumerate(rows):
        buf[i, : len(row)] = row
    res = op.rewrite(jax.random.key(seed(0, "rewrite")), jnp.asarray([0, 3, 5]), jnp.asarray(buf),
                              jnp.asarray([len(r) for r in rows]), params)
    for i in range(3):
        assert np.asarray(res.tokens[i, : res.lengths[i]]).tolist() == [0, a, b], np.asarray(res.tokens[i])
    assert not np.asarray(res.truncated).any()
    assert tok.decode([0]) == "!"

    # max_new_tokens is its own limit: 2 tokens cannot reach the EOS -> truncated, flagged.
    op2, params2 = LLMOperator.create(lm, tok, operation_templates(OPERATIONS), max_len=L, max_new_tokens=2,
                                      temperature=0.0)
    res2 = op2.rewrite(jax.random.key(0), jnp.asarray([0, 3, 5]), jnp.asarray(buf),
                                jnp.asarray([len(r) for r in rows]), params2)
    assert np.asarray(res2.truncated).all() and np.asarray(res2.lengths).tolist() == [2, 2, 2]
    kept, kept_len, _ = op2.apply(jax.random.key(0), jnp.asarray([0, 3, 5]), jnp.asarray(buf),
                                  jnp.asarray([len(r) for r in rows]), params2)
    assert np.array_equal(np.asarray(kept), buf) and np.asarray(kept_len).tolist() == [len(r) for r in rows]
    # (A rewrite longer than the buffer is flagged too: test_cut_at_eos_uses_the_eos_list_never_pad.)


@pytest.mark.parametrize("which", ["spm", "bpe"])
def test_operator_prompt_ids_equal_the_rendered_chat_prompt(which, spm_tok, bpe_tok):
    """The jitted prompt (pieces + instruction buffer) is token for token the tokenizer's encoding of
    the prompt text in the instructor's own chat format (Llama-3 template / Vicuna for the Llama-2
    SentencePiece one). Catches: pieces tokenized apart (a lone "▁" or a split ".\\n"), the chat
    template ignored, BOS missing or doubled."""
    tok = spm_tok if which == "spm" else bpe_tok
    lm = init(dict(TINY, vocab_size=len(tok), num_hidden_layers=1), jax.random.key(seed(5, "init")))
    L = 40
    op, params = LLMOperator.create(lm, tok, operation_templates(OPERATIONS), max_len=L, max_new_tokens=4)
    texts, _ = read_seed_records()
    tids = operation_piece_ids(tok, operation_templates(OPERATIONS))
    for k, text in enumerate(texts[:12]):
        a = k % len(OPERATIONS)
        row = tok(text, add_special_tokens=False)["input_ids"]
        ids, mask = op.prompts(jnp.asarray([a]), jnp.asarray([row + [op.pad_id] * (L - len(row))]),
                               jnp.asarray([len(row)]), params)
        got = np.asarray(ids[0])[np.asarray(mask[0]) == 1].tolist()
        full = instructor_prompt(OPERATIONS[a], text, tok)
        if which == "bpe":
            assert full.startswith("<|begin_of_text|><|start_header_id|>user")
        else:
            assert full.startswith("A chat between") and full.endswith(" ASSISTANT:")
        # The text the ids encode: instructor_prompt's words, only the whitespace around the slot normalised.
        want_text = tids[a].text_pieces[0] + text + tids[a].text_pieces[1]
        assert want_text.split() == full.split(), (want_text, full)
        want = tok(want_text, add_special_tokens=False)["input_ids"]
        if not want_text.startswith(tok.bos_token):
            want = [tok.bos_token_id] + want
        assert got == want, (which, text, tok.convert_ids_to_tokens(got)[-12:], tok.convert_ids_to_tokens(want)[-12:])


def test_operator_refuses_pad_equal_to_eos():
    with pytest.raises(ConfigError, match="pad is never EOS"):
        LLMOperator(lm=None, max_len=4, max_new_tokens=4, prompt_width=8, eos_ids=(2,), pad_id=2)


def test_judge_reward_is_softmax_of_answer_logits():
    """Catches: the wrong position read (not the last), the answers swapped, a softmax over the whole vocab."""
    r = rng(13, "judge")
    lm = init(TINY, jax.random.key(seed(13, "init")))
    from teams_rl_jax.env.judge import judge_reward

    ids = jnp.asarray(r.integers(3, 97, size=(3, 9)), jnp.int32)
    mask = jnp.asarray(np.arange(9)[None, :] >= np.array([[0], [3], [6]]), jnp.int32)
    answers = (11, 42)
    got = jax.jit(lambda p, i, m: judge_reward(lm, p, i, m, answers))(lm.params, ids, mask)
    logits = np.asarray(lm.apply(lm.params, ids, mask), np.float64)[:, -1]
    two = logits[:, list(answers)]
    expect = np.exp(two[:, 1]) / np.exp(two).sum(-1)
    np.testing.assert_allclose(np.asarray(got), expect, atol=1e-6)
    assert np.asarray(not_equal_probability(jnp.zeros((1, 97)), answers)).tolist() == [0.5]
