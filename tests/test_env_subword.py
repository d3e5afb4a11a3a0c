"""The env with a byte-level BPE tokenizer (Ġ word-start markers, rarer words split into pieces, a bare
"Ġ" before some words): phrases are tokenized in context, the vocabulary tables count words and find
stop words / template phrases as the text rules do, edits decode to clean text."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from teams_rl_jax.env import OPERATIONS, eliminate, make, phrases
from teams_rl_jax.env.elimination import DEFAULT_RULES, ELIMINATION_RULES, eliminated_tokens, word_count
from teams_rl_jax.env.seeds import read_seed_records


@pytest.fixture(scope="module")
def bpe_env():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts, _ = read_seed_records()
    corpus = texts + [p for bank in phrases.BANKS.values() for p in bank] + list(phrases.CONCRETE_TERMS)
    corpus += [s for v in phrases.CONCRETE_TERMS.values() for s in v] + list(phrases.TEMPLATE_PHRASES)
    # Common words become whole tokens in a real vocabulary; repeat them so this small one learns them.
    words = sorted(phrases.STOPWORDS)
    corpus += ([" ".join(words), " ".join(w.title() for w in words)] + words + [w.title() for w in words]) * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    return make("token_edit", tokenizer=fast)


def _buffers(env, params, texts):
    rows = [env.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    buf = np.zeros((len(rows), params.max_len), np.int32)
    for i, r in enumerate(rows):
        buf[i, : len(r)] = r
    return jnp.asarray(buf), jnp.asarray([len(r) for r in rows], jnp.int32)


def test_bpe_rules_match_text_rules(bpe_env):
    env, params = bpe_env
    old = "Describe a city."
    news = ["Describe a city.", "It is what it is.", "Describe the given prompt in a city.",
            "Sorry, the city is not there.", "Describe a city in winter and explain the causes."]
    buf, lens = _buffers(env, params, [old] + news)

    @jax.jit
    def run(buf, lens):
        inst = jax.vmap(lambda t, n: env.describe(params, t, n))(buf, lens)
        before = jax.tree.map(lambda x: jnp.broadcast_to(x[0], x[1:].shape), inst)
        after = jax.tree.map(lambda x: x[1:], inst)
        flags = jax.vmap(lambda b, a: eliminated_tokens(b, a, params.tables, DEFAULT_RULES))(before, after)
        return flags, jax.vmap(lambda t, n: word_count(t, n, params.tables))(buf, lens)

    flags, words = run(buf, lens)
    assert np.asarray(words).tolist() == [len(t.replace(",", " ").replace(".", " ").split()) for t in [old] + news]
    for i, new in enumerate(news):
        for rule in DEFAULT_RULES:
            assert bool(flags[rule][i]) == ELIMINATION_RULES.get(rule).text(old, new), (rule, new)
    assert [eliminate(old, n) for n in news] == ["no_gain", "stopwords_only", "template_copy", "sorry_short", None]


def test_bpe_edits_decode_cleanly(bpe_env):
    env, params = bpe_env
    text = "Describe an animal in a city."
    buf, lens = _buffers(env, params, [text] * 4)
    ops = jnp.asarray([OPERATIONS.index(o) for o in ("concretizing", "deepening", "complicate_input", "concretizing")])
    ctx = {"domain": jnp.full((4,), -1, jnp.int32), "seed": jnp.full((4,), -1, jnp.int32)}
    new, n, _ = jax.jit(env.operator.apply)(jax.random.PRNGKey(1), ops, buf, lens, params.operator, ctx)
    outs = env.decode(new, n)
    for out in (outs[0], outs[3]):
        assert any(out in (text.replace(g, s) for s in specifics) for g, specifics in phrases.CONCRETE_TERMS.items()), out
    assert any(outs[1] == f"{text} {p}" for p in phrases.BANKS["deepening"]), outs[1]
    assert any(outs[2] == f"{text} {p}" for p in phrases.BANKS["complicate_input"]), outs[2]
