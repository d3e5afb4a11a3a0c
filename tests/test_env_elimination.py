"""WizardLM's elimination rules: text checks and jnp buffer checks agree; reasons; vocabulary tables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from env_helpers import default_env
from teams_rl_jax.env import eliminate
from teams_rl_jax.env.elimination import DEFAULT_RULES, eliminated_tokens, word_count

LONG_SORRY = "Sorry, " + " ".join(["Describe the city."] * 30)
EXAMPLES = [
    # (old, new, reason)
    ("Describe a city.", "Describe a city.", "no_gain"),
    ("Describe a city.", "Describe a city. Explain the underlying causes.", None),
    ("Describe a city.", "Sorry, I do not have a city.", "sorry_short"),
    ("Describe a city.", LONG_SORRY, None),
    ("Describe a city.", "It is what it is.", "stopwords_only"),
    ("Describe a city.", "Is it? Do it, then.", "stopwords_only"),
    ("Describe a city.", "Rewritten Prompt: Describe a city.", "template_copy"),
    ("Describe a city.", "Describe the given prompt in a city.", "template_copy"),
    ("Describe a city.", "New instruction: Describe a city.", "template_copy"),
    ("Describe a city.", "Describe a city for a new reader.", None),
]


def _token_checks(pairs):
    env, params, _ = default_env()
    L = params.max_len
    rows = []
    for old, new in pairs:
        for t in (old, new):
            ids = env.tokenizer(t, add_special_tokens=False)["input_ids"]
            assert env.tokenizer.unk_token_id not in ids, t  # examples use in-vocabulary words only
            rows.append(ids)
    buf = np.zeros((len(rows), L), np.int32)
    for i, r in enumerate(rows):
        buf[i, : len(r)] = r
    lens = jnp.asarray([len(r) for r in rows], jnp.int32)

    @jax.jit
    def run(buf, lens):
        inst = jax.vmap(lambda t, n: env.describe(params, t, n))(buf, lens)
        before = jax.tree.map(lambda x: x[0::2], inst)
        after = jax.tree.map(lambda x: x[1::2], inst)
        flags = jax.vmap(lambda b, a: eliminated_tokens(b, a, params.tables, DEFAULT_RULES))(before, after)
        return flags, jax.vmap(lambda t, n: word_count(t, n, params.tables))(buf, lens)

    flags, words = run(jnp.asarray(buf), lens)
    return {k: np.asarray(v) for k, v in flags.items()}, np.asarray(words)[1::2]


def test_text_and_token_rules_agree():
    flags, words = _token_checks([(o, n) for o, n, _ in EXAMPLES])
    from teams_rl_jax.env.elimination import ELIMINATION_RULES

    for i, (old, new, reason) in enumerate(EXAMPLES):
        assert eliminate(old, new) == reason, (new, eliminate(old, new))
        for rule in DEFAULT_RULES:
            text_hit = ELIMINATION_RULES.get(rule).text(old, new)
            assert bool(flags[rule][i]) == bool(text_hit), (rule, new)
    assert words[3] > 80 and words[2] < 80  # the 80-word threshold is counted the same way


def test_eliminate_options():
    assert eliminate("Describe a city.", "Describe a town.", judge_equal=True) == "no_gain"
    assert eliminate("Describe a city.", "Describe a town.", judge_equal=False) is None
    assert eliminate("a", "Sorry, no.", rules=("no_gain",)) is None
    assert eliminate("a", "I'm SORRY.") == "sorry_short"
    assert eliminate("a", "#Rewritten Prompt#: list three cities") == "template_copy"
    assert eliminate("a", "") == "stopwords_only"
    with pytest.raises(Exception, match="unknown elimination rule"):
        eliminate("a", "b", rules=("bogus",))
