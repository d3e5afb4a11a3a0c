"""The reviewer judge with real-shaped tokenizers (Llama-2 SentencePiece, Llama-3-like byte-level BPE):
answer ids in context, prompt pieces verified against the full encoding, a reviewer whose logits are
built to prefer one answer, tokenizer identity between roles, pad never EOS."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import seed

from tokenizer_fixtures import byte_level_bpe_tokenizer, eos_ids_of, llama2_spm_tokenizer


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
    return llama2_spm_tokenizer(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory):
    return byte_level_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


def test_spm_fixture_has_the_llama2_leading_space_premise(spm_tok):
    """Issue 7 defect 2's premise: with the Llama-2 tokenizer.json normalizer, " Equal" tokenized alone
    starts with a lone whitespace piece, while after "ASSISTANT:" in context it is one "▁Equal" piece."""
    assert (spm_tok.bos_token_id, spm_tok.eos_token_id, spm_tok.unk_token_id) == (1, 2, 0)
    alone = spm_tok.convert_ids_to_tokens(spm_tok(" Equal", add_special_tokens=False)["input_ids"])
    assert alone[0] == "▁", alone
    in_context = spm_tok.convert_ids_to_tokens(spm_tok("ASSISTANT: Equal", add_special_tokens=False)["input_ids"])
    assert in_context[-1] == "▁Equal", in_context
    assert spm_tok("x")["input_ids"][0] == 1  # <s> prepended like Llama-2


def test_byte_level_fixture_has_two_eos_and_a_distinct_pad(bpe_tok):
    eos = eos_ids_of(bpe_tok)
    assert len(eos) == 2 and bpe_tok.pad_token_id not in eos
    assert bpe_tok.convert_ids_to_tokens([0])[0] == "!"  # id 0 is a real token, as in Llama-3
    assert bpe_tok.chat_template


# ------------------------------------------------------------------------------------------ answers
def _prompt_ids(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids if text.startswith(tok.bos_token) else [tok.bos_token_id] + ids


@pytest.mark.parametrize("which", ["spm", "bpe"])
def test_answer_ids_come_from_prompt_plus_answer(which, spm_tok, bpe_tok):
    """The answer ids are the first tokens after the judge prompt in the encoding of prompt + answer.
    Catches: answers tokenized on their own (the Llama-2 SentencePiece one then gives the lone "▁" for
    both answers, so the judge would compare a whitespace piece with itself)."""
    from teams_rl_jax.env.judge import ANSWERS, answer_token_ids, judge_prompt
    from teams_rl_jax.env.pieces import answer_join

    tok = spm_tok if which == "spm" else bpe_tok
    eq, neq = answer_token_ids(tok)
    text = judge_prompt("Describe a city.", "Describe a city in winter.", tok)
    fulls = [_prompt_ids(tok, text + answer_join(text) + ans.strip()) for ans in ANSWERS]
    k = len(_prompt_ids(tok, text))
    assert all(f[:k] == _prompt_ids(tok, text) for f in fulls)  # the prompt's ids are undisturbed
    assert (fulls[0][k], fulls[1][k]) == (eq, neq), (which, fulls[0][k:], fulls[1][k:])
    pieces = tok.convert_ids_to_tokens([eq, neq])
    if which == "spm":
        assert pieces == ["▁Equal", "▁Not"], pieces  # what follows "ASSISTANT:" in context
        alone = tok(" Equal", add_special_tokens=False)["input_ids"][0]
        assert alone not in (eq, neq)
    else:  # after Llama-3's "<|end_header_id|>\n\n" the answer has no leading space
        assert tok.decode([eq]) == "Equal" and "Ġ" not in pieces[1], pieces


@pytest.mark.parametrize("which", ["spm", "bpe"])
def test_judge_prompt_ids_equal_the_full_prompt_encoding(which, spm_tok, bpe_tok):
    """The jitted reviewer prompt (piece ids + instruction buffers) is token for token the encoding of
    the judge prompt text in the reviewer's chat format, for seed pairs that were not the probes.
    Catches: pieces tokenized apart (issue 7 defect 2's second half), the chat template ignored."""
    import jax.numpy as jnp
    import numpy as np

    from teams_rl_jax.env.judge import judge_prompt, judge_prompt_ids, judge_template_ids
    from teams_rl_jax.env.seeds import read_seed_records

    tok = spm_tok if which == "spm" else bpe_tok
    tids = judge_template_ids(tok)
    texts, _ = read_seed_records()
    pairs = [(texts[i], texts[i + 1]) for i in range(0, 16, 2)]
    L = 40
    enc = [[tok(t, add_special_tokens=False)["input_ids"] for t in pair] for pair in pairs]
    buf = np.zeros((2, len(pairs), L), np.int32)
    lens = np.zeros((2, len(pairs)), np.int32)
    for b, rows in enumerate(enc):
        for k, r in enumerate(rows):
            buf[k, b, : len(r)], lens[k, b] = r, len(r)
    ids, mask = judge_prompt_ids(tids.pieces, jnp.asarray(buf[0]), jnp.asarray(lens[0]), jnp.asarray(buf[1]),
                                 jnp.asarray(lens[1]), pad_id=0)
    for b, (old, new) in enumerate(pairs):
        got = np.asarray(ids[b])[np.asarray(mask[b]) == 1].tolist()
        text = tids.text_pieces[0] + old + tids.text_pieces[1] + new + tids.text_pieces[2]
        assert text.split() == judge_prompt(old, new, tok).split()
        assert got == _prompt_ids(tok, text), (which, old, new)


# --------------------------------------------------------------------------- a reviewer with a rule
def _marker_reviewer(vocab: int, marker: int, equal: int, not_equal: int, hidden: int = 64):
    """A one-layer Llama whose next-token logits favour "Not Equal" iff ``marker`` occurs in the prompt.

    q_proj = 0 makes attention uniform over the prompt; v_proj reads the marker feature (embedding
    dim 2, only the marker has it) and o_proj writes its mean into dim 3, where every token's embedding
    holds -0.5. So at the last position dim 3 is -0.5 without a marker and >= +1.5 with one (prompts
    under 200 tokens); lm_head reads dim 3 as +logit for "Not Equal" and -logit for "Equal", a margin
    of ~7 nats either way (asserted below), far from a tie. The MLP is zeroed.
    """
    from teams_rl_jax.models import init

    cfg = dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
               num_attention_heads=1, num_key_value_heads=1, initializer_range=0.02, eos_token_id=2, bos_token_id=1)
    lm = init(cfg, jax.random.key(seed(17, "reviewer_init")))
    p = jax.tree.map(np.array, lm.params)
    emb = np.zeros((vocab, hidden), np.float32)
    emb[:, 0], emb[:, 3] = 1.0, -0.5
    emb[marker, 2] = 50.0
    p["embed_tokens"]["embedding"] = emb
    attn = p["layers"]["self_attn"]
    attn["q_proj"]["kernel"][:] = 0.0
    attn["v_proj"]["kernel"][:] = 0.0
    attn["v_proj"]["kernel"][0, 2, 2] = 1.0
    attn["o_proj"]["kernel"][:] = 0.0
    attn["o_proj"]["kernel"][0, 2, 3] = 50.0
    p["layers"]["mlp"]["down_proj"]["kernel"][:] = 0.0
    head = np.zeros((hidden, vocab), np.float32)
    head[3, not_equal], head[3, equal] = 1.0, -1.0
    p["lm_head"]["kernel"] = head
    return lm.replace(params=jax.tree.map(jnp.asarray, p))


def test_reviewer_rewards_follow_the_reviewers_logits(spm_tok):
    """The env's reviewer term on a reviewer built to answer "Not Equal" exactly when the new
    instruction carries a marker token: reward ~1 for that pair, ~0 for a pair without it.
    Catches: the new instruction left out of the assembled prompt, the answers swapped, the answer ids
    read out of context (then both are "▁" and the reward is 0.5), the wrong logit position."""
    from teams_rl_jax.env.buffers import Instruction
    from teams_rl_jax.env.judge import answer_token_ids, judge_template_ids, reviewer_term

    tok = spm_tok
    old = "Describe a city."
    new_marked = "Describe a city. Explain the underlying causes."
    new_plain = "Describe a city in a few words."
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    used = set(enc(old)) | set(enc(new_plain)) | {i for p in judge_template_ids(tok).pieces for i in p}
    marker = next(i for i in enc(new_marked) if i not in used)
    eq, neq = answer_token_ids(tok)
    reviewer = _marker_reviewer(len(tok), marker, eq, neq)
    term, params = reviewer_term(reviewer, tok, env_tokenizer=tok)

    L = 24

    def inst(texts):
        rows = [enc(t) for t in texts]
        buf = np.zeros((len(rows), L), np.int32)
        for i, r in enumerate(rows):
            buf[i, : len(r)] = r
        n = len(rows)
        return Instruction(jnp.asarray(buf), jnp.asarray([len(r) for r in rows]), jnp.zeros((n, 4)),
                           jnp.zeros((n,), jnp.int32))

    reward = jax.jit(lambda p, a, b: term.fn(jax.random.key(0), a, b, {"params": p}))(
        params, inst([old, old, new_plain]), inst([new_marked, new_plain, new_marked]))
    r = np.asarray(reward)
    assert r[0] > 0.999 and r[2] > 0.999 and r[1] < 1e-3, r  # ~7-nat margins: not a near-tie
    assert term.role == "reviewer" and term.cost == 1.0


# ------------------------------------------------------------------------------- tokenizer identity
def test_env_and_reviewer_tokenizers_are_compared(spm_tok, bpe_tok, tmp_path):
    """Defect 7: a reviewer (or instructor) built with another tokenizer than the env's raises one
    ConfigError at construction; the same tokenizer (even a reloaded copy) passes.
    Catches: a missing or always-true comparison (silent id mix-up)."""
    from teams_rl_jax.data.tokenizer import load_tokenizer, same_tokenizer, tokenizer_fingerprint
    from teams_rl_jax.env.judge import check_role_tokenizers, reviewer_term
    from teams_rl_jax.errors import ConfigError
    from teams_rl_jax.models import init

    lm = init(dict(model_type="llama", vocab_size=len(spm_tok), hidden_size=16, intermediate_size=16,
                   num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1), jax.random.key(seed(2, "init")))
    with pytest.raises(ConfigError, match="env and reviewer: tokenizers differ"):
        reviewer_term(lm, spm_tok, env_tokenizer=bpe_tok)
    term, _ = reviewer_term(lm, spm_tok, env_tokenizer=load_tokenizer(spm_tok.name_or_path))
    assert same_tokenizer(spm_tok, load_tokenizer(spm_tok.name_or_path))
    check_role_tokenizers(spm_tok, None, [term])
    with pytest.raises(ConfigError, match="reward term 'reviewer'"):
        check_role_tokenizers(bpe_tok, None, [term])

    fp = tokenizer_fingerprint(bpe_tok)

    class Op:
        tokenizer_fingerprint = fp

    with pytest.raises(ConfigError, match="instructor operator"):
        check_role_tokenizers(spm_tok, Op(), [])
    # One added token changes the ids of text containing it: a different tokenizer.
    changed = load_tokenizer(spm_tok.name_or_path)
    changed.add_tokens(["winterland"])
    assert not same_tokenizer(spm_tok, changed)


def test_load_tokenizer_pad_is_never_eos(spm_tok, bpe_tok, tmp_path):
    """Defect 4: ``load_tokenizer`` takes pad from the tokenizer and never sets pad = EOS (a Llama-3
    style tokenizer without pad got pad = eos before). Catches: pad = eos fallback, EOS list missing
    the generation_config.json ids."""
    import shutil

    from teams_rl_jax.data.tokenizer import eos_token_ids, load_tokenizer

    d = tmp_path / "nopad"
    shutil.copytree(bpe_tok.name_or_path, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(d)
    eos = eos_token_ids(tok)
    assert set(eos) == set(eos_ids_of(bpe_tok)) and len(eos) == 2
    assert tok.pad_token_id is not None and tok.pad_token_id not in eos and tok.pad_token_id != 0
    spm = load_tokenizer(spm_tok.name_or_path)
    assert spm.pad_token_id == spm.unk_token_id == 0 and eos_token_ids(spm) == (2,)


def test_text_level_builders():
    """Text builders for HTTP backends carry the instructions and the operation's wording."""
    from teams_rl_jax.data.chat import render_chat
    from teams_rl_jax.roles.reviewer import judge_messages, parse_lenient
    from teams_rl_jax.env.prompts import expert_messages, instructor_messages

    m = judge_messages(" Describe a city. ", "Describe a city in winter.")
    assert m[0]["role"] == "user" and "First instruction:\nDescribe a city.\nSecond" in m[0]["content"]
    ins = instructor_messages("deepening", "Describe a city.")
    assert "Describe a city." in ins[0]["content"] and "more depth" in ins[0]["content"]
    assert render_chat(None, ins).endswith("ASSISTANT:")
    assert expert_messages("Sum these.", "1, 2")[0]["content"] == "Sum these.\n\n1, 2"
    assert parse_lenient("Not Equal") == 1.0 and parse_lenient("Equal") == 0.0


def test_llm_env_rewards_follow_the_reviewer_and_buffers_hold_the_instructors_ids(spm_tok):
    """Issue 11, through the env's batched step: an instructor built to answer ``A B <eos>`` and a
    reviewer built to say "Not Equal" iff a marker token is in its prompt (only seed 0 has it).
    Rewards follow the reviewer (row 0 high, the others low and eliminated as no_gain), and the kept
    rewrite's buffer holds exactly the instructor's generated ids.
    Catches: reviewer prompt built from the wrong buffers, judge not wired to no_gain, generated ids
    not written to the new buffer, rows mixed up in the batch."""
    from teams_rl_jax.env import OPERATIONS, make, operation_templates
    from teams_rl_jax.env.judge import answer_token_ids, judge_template_ids, reviewer_term
    from teams_rl_jax.env.llm_operator import LLMOperator, operation_piece_ids
    from teams_rl_jax.env.seeds import read_seed_records
    from test_llm_operator import _chain_lm

    tok = spm_tok
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    texts, _ = read_seed_records()
    seeds4 = texts[:4]
    fixed = {i for p in judge_template_ids(tok).pieces for i in p}
    ops = operation_piece_ids(tok, operation_templates(OPERATIONS))
    fixed |= {i for t in ops for p in t.pieces for i in p}
    others = set().union(*(enc(t) for t in seeds4[1:]))
    marker = next(i for i in enc(seeds4[0]) if i not in fixed | others)
    a, b = [i for i in range(300, 600) if i not in fixed | others | set(enc(seeds4[0]))][:2]
    last = {t.pieces[1][-1] for t in ops}
    instructor = _chain_lm(len(tok), {**{s: a for s in last}, a: b, b: tok.eos_token_id}, eos=tok.eos_token_id)
    eq, neq = answer_token_ids(tok)
    reviewer = _marker_reviewer(len(tok), marker, eq, neq)
    L = 32
    op, op_params = LLMOperator.create(instructor, tok, operation_templates(OPERATIONS), max_len=L, max_new_tokens=4,
                                       temperature=0.0)
    term, r_params = reviewer_term(reviewer, tok, env_tokenizer=tok)
    env, params = make("llm", tokenizer=tok, seeds=seeds4, operator=op, operator_params=op_params,
                       reward_terms=[term], term_params={"reviewer": r_params}, max_len=L,
                       reward_weights={"reviewer": 1.0})
    _, state = jax.vmap(env.reset_to, in_axes=(0, None))(jnp.arange(4), params)
    actions = jnp.asarray([OPERATIONS.index(o) for o in ("deepening", "add_constraints", "breadth", "concretizing")])
    _, new_state, reward, _, info = jax.jit(env.step_batch)(jax.random.key(seed(4, "step")), state, actions, params)
    judge = np.asarray(info["reward_terms"]["reviewer"])
    assert judge[0] > 0.999 and (judge[1:] < 1e-3).all(), judge
    r = np.asarray(reward)
    assert r[0] > r[1:].max(), r
    assert np.asarray(info["eliminated"]["no_gain"]).tolist() == [False, True, True, True]
    n0 = int(new_state.instruction.length[0])
    assert np.asarray(new_state.instruction.tokens[0, :n0]).tolist() == [a, b]
    for i in range(1, 4):  # eliminated rewrites are dropped: the seed stays
        n = int(new_state.instruction.length[i])
        assert np.asarray(new_state.instruction.tokens[i, :n]).tolist() == enc(seeds4[i])
