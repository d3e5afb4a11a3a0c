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


# ------------------------------------------------------------- rule 4 with a SentencePiece vocabulary
TEMPLATE_CASES = [
    ("Describe a city.\n#Rewritten Prompt#: list three cities.", True),
    ("Describe a city.\nRewritten instruction: Describe a town.", True),
    ("#Given Prompt# Describe a city.", True),
    ("Describe a city.\n\nNew instruction:\nDescribe a town.", True),
    ("Describe the given prompt in a city.", True),
    ("Describe a city in winter.", False),
    ("Rewrite a city guide for new readers.", False),
]


def test_template_copy_after_newline_with_sentencepiece(tmp_path):
    """Issue 7 defect 6: with a Llama-2 SentencePiece vocabulary a phrase after a newline or "#" has no
    word-start "▁" ("\\n#Rewritten Prompt#" -> "<0x0A>", "#", "Rewritten", "▁Prompt"); the buffer rule
    must still find it, agreeing with the text rule. Catches: variants built only from the phrase alone
    and after a space (``phrase_variants``), which miss the first three cases."""
    from tokenizer_fixtures import llama2_spm_tokenizer
    from teams_rl_jax.env.buffers import Instruction
    from teams_rl_jax.env.elimination import build_vocab_tables, text_template_copy, tokens_template_copy

    tok = llama2_spm_tokenizer(tmp_path)
    tables = build_vocab_tables(tok)
    L = 32
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t, _ in TEMPLATE_CASES]
    buf = np.zeros((len(rows), L), np.int32)
    for i, r in enumerate(rows):
        buf[i, : len(r)] = r
    n = len(rows)
    after = Instruction(jnp.asarray(buf), jnp.asarray([len(r) for r in rows]), jnp.zeros((n, 4)), jnp.zeros((n,)))
    hits = jax.jit(jax.vmap(lambda a: tokens_template_copy(a, a, tables, {})))(after)
    for (text, want), hit in zip(TEMPLATE_CASES, np.asarray(hits)):
        assert bool(hit) == want == text_template_copy("", text), (text, tok.convert_ids_to_tokens(
            tok(text, add_special_tokens=False)["input_ids"]))


def test_eliminate_text_judges_the_answer_with_rules_2_3():
    """WizardLM's rules 2-3 judge the expert's *response*; rules 1 and 4 the instruction.
    Catches: rules 2-3 applied to the instruction when an answer is given, or the reverse for rule 4."""
    from teams_rl_jax.env.elimination import eliminate_text

    old, new = "Describe a city.", "Describe a city in winter and explain the causes."
    ok = eliminate_text(old, new, answer="Cities in winter " + "change a great deal because of snow. " * 3)
    assert not any(ok.values()), ok
    sorry = eliminate_text(old, new, answer="Sorry, I cannot answer that.")
    assert sorry["sorry_short"] and not sorry["template_copy"] and not sorry["no_gain"]
    empty = eliminate_text(old, new, answer="It is what it is.")
    assert empty["stopwords_only"] and not empty["sorry_short"]
    # Without an answer, rules 2-3 fall back to the instruction (the env's proxy).
    assert eliminate_text(old, "Sorry, no.")["sorry_short"]
    assert not eliminate_text(old, "Sorry, no.", answer="A long and useful answer about cities in winter.")["sorry_short"]
    # Rule 4 looks at the instruction, whatever the answer says.
    assert eliminate_text(old, "#Rewritten Prompt# Describe a town.", answer="Towns are small.")["template_copy"]
    assert not eliminate_text(old, new, answer="The #Rewritten Prompt# asks for winter.")["template_copy"]
    assert eliminate_text(old, new, truncated=True)["truncated"] and eliminate_text(old, old)["no_gain"]
