"""The LLM roles on text (``teams_rl_jax.roles``): the reviewer's two parsers, the instructor's prompt,
``clean_rewrite``, truncation flag and served-token count, and what the jitted in-process operator
produces instead (the reply verbatim: it strips no label line).

Each test's docstring names the mutations it catches.
"""

import numpy as np
import pytest

from teams_rl_jax.backends.base import Completion, QueryCounter
from teams_rl_jax.backends.config import RoleConfig, RolesConfig, max_new_tokens
from teams_rl_jax.config import from_dict, to_dict
from teams_rl_jax.errors import ConfigError
from teams_rl_jax.roles.instructor import Instructor, clean_rewrite
from teams_rl_jax.roles.reviewer import Reviewer, parse_exact, parse_lenient, parse_reply

NOT_EQUAL = ["They are not the same.", "Equal? No, they differ.", "NOT EQUAL", "Not equal.", "Not Equal",
             "They aren't equal.", "The second is different: it adds a constraint."]
EQUAL = ["Equal", "They are equal.", "equal.", "The two are the same.", "They don't differ.",
         "Not different at all."]
UNREADABLE = ["I cannot tell.", "No.", "Explain how an animal adapts", ""]


@pytest.mark.parametrize("text", NOT_EQUAL)
def test_lenient_reads_not_equal_in_sentences(text):
    """Catches: keyword matching that reads "not the same" / "Equal? No" as Equal (their keywords)."""
    assert parse_lenient(text) == 1.0


@pytest.mark.parametrize("text", EQUAL)
def test_lenient_reads_equal(text):
    """Catches: any mention of "not"/"differ" read as Not Equal (a negated difference is Equal)."""
    assert parse_lenient(text) == 0.0


@pytest.mark.parametrize("text", UNREADABLE)
def test_lenient_unreadable_is_none(text):
    """Catches: an unreadable reply silently scored as a verdict instead of counted."""
    assert parse_lenient(text) is None


def test_exact_is_the_reference_rule():
    """Catches: exact reading sentences or case variants (the reference compares the stripped reply)."""
    assert parse_exact(" Not Equal\n") == 1.0
    for text in ["Not equal.", "NOT EQUAL", "They are not the same.", "Equal", "", "I cannot tell."]:
        assert parse_exact(text) == 0.0, text
    assert parse_reply("Not equal.", "exact") == 0.0 and parse_reply("Not equal.", "lenient") == 1.0
    with pytest.raises(ConfigError, match="parser"):
        parse_reply("Equal", "fuzzy")


class Scripted:
    """A Backend (the protocol) answering from a list and recording its calls."""

    def __init__(self, role, answers):
        self.role, self.model, self.counter, self.answers, self.calls = role, "scripted", QueryCounter(), answers, []

    def complete(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, stop=None, seed=None):
        self.calls.append({"prompts": prompts, "max_new_tokens": max_new_tokens, "temperature": temperature,
                           "seed": seed})
        self.counter.add(self.role, len(prompts))
        return [self.answers[i % len(self.answers)] for i in range(len(prompts))]


def test_reviewer_counts_unparseable_and_uses_its_reply_length():
    """Catches: the reviewer's 8 tokens hard-coded (not the role's max_new_tokens), sampling instead of
    greedy, unparseable replies not counted, the parser setting ignored."""
    rev = Reviewer(Scripted("reviewer", [Completion("They are not the same."), Completion("Hmm."),
                                         Completion("Not different at all.")]), 5, "lenient")
    assert rev.judge(["a", "b", "c", "d"], ["a b", "b c", "c d", "d e"], seed=3) == [1.0, None, 0.0, 1.0]
    assert rev.stats == {"calls": 1, "rows": 4, "unparseable": 1}
    call = rev.backend.calls[0]
    assert call["max_new_tokens"] == 5 and call["temperature"] == 0.0 and call["seed"] == 3
    assert "First instruction:\na\nSecond instruction:\na b" in call["prompts"][0][0]["content"]
    exact = Reviewer(Scripted("reviewer", [Completion("They are not the same.")]), 8, "exact")
    assert exact.judge(["a"], ["b"]) == [0.0] and exact.stats["unparseable"] == 0


def test_instructor_cleans_flags_truncation_and_counts_served_tokens():
    """Catches: clean_rewrite not applied (the policy trained on labelled rewrites), the truncation flag
    not read from finish_reason, served tokens not taken from the reply's usage, the operation's template
    not in the prompt."""
    answers = [Completion("Rewritten instruction: Explain frost in Oslo.", None, "stop", completion_tokens=12),
               Completion("Explain frost", None, "length", completion_tokens=4),
               Completion("Explain it.", (5, 6, 7))]
    be = Scripted("instructor", answers)
    out = Instructor(be, max_new_tokens=32, temperature=0.5, top_p=0.9).rewrite(
        ["Explain frost.", "Explain ice.", "Explain snow."], ["deepening", "breadth", "concretizing"], seed=7)
    assert [r.text for r in out] == ["Explain frost in Oslo.", "Explain frost", "Explain it."]
    assert [r.truncated for r in out] == [False, True, False]
    # The label is 22 of 45 characters: the served count is scaled to the text kept.
    assert out[0].served_tokens == round(12 * len("Explain frost in Oslo.") / 45)
    assert out[1].served_tokens == 4 and out[2].served_tokens == 3  # flax backends: len(token_ids)
    call = be.calls[0]
    assert call["max_new_tokens"] == 32 and call["seed"] == 7 and call["temperature"] == 0.5
    assert "more depth" in call["prompts"][0][0]["content"] and "Explain frost." in call["prompts"][0][0]["content"]
    assert clean_rewrite("  #Rewritten Prompt#: Do X. ") == "Do X."


def test_max_new_tokens_is_set_once_per_role():
    """Catches: the role's setting ignored, or a role default other than the documented one."""
    roles = from_dict(RolesConfig, {"reviewer": {"backend": "openai", "base_url": "http://127.0.0.1:1/v1",
                                                 "model": "m", "max_new_tokens": 3, "parser": "exact"}}, "roles")
    assert max_new_tokens(roles, "reviewer") == 3
    # The written config keeps it (a field named *tokens* is no secret; the key's variable name still is).
    written = to_dict(roles)["reviewer"]
    assert written["max_new_tokens"] == 3 and written["parser"] == "exact"
    assert to_dict(RoleConfig(backend="openai", base_url="http://x/v1", model="m", api_key_env="K"))["api_key_env"] == "***"
    assert (max_new_tokens(roles, "instructor"), max_new_tokens(None, "reviewer"), max_new_tokens(None, "expert")) == (
        256, 8, 512)
    with pytest.raises(ConfigError, match="roles.reviewer.*parser"):
        from_dict(RolesConfig, {"reviewer": {"backend": "openai", "base_url": "http://x/v1", "model": "m",
                                             "parser": "fuzzy"}}, "roles")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        RoleConfig(backend="openai", base_url="http://x/v1", model="m", max_new_tokens=0).validate()


def test_jitted_operator_keeps_the_reply_verbatim():
    """The jitted in-process operator (``env.llm_operator``) runs on token ids inside jit: it writes the
    generated ids into the buffer as they are, so a label the instructor writes stays (the text path
    strips it). Catches: a change to either path that makes this documented difference silent."""
    import jax
    import jax.numpy as jnp

    from teams_rl_jax.env import OPERATIONS, operation_templates
    from teams_rl_jax.env.llm_operator import LLMOperator
    from teams_rl_jax.env.seeds import decode, offline_tokenizer, seeds_from_texts
    from test_llm_operator import _chain_lm

    tok = offline_tokenizer(["Explain frost."])
    ids = lambda w: tok.convert_tokens_to_ids(w)  # noqa: E731
    # The prompt ends with "ASSISTANT:"; the instructor answers "Rewritten instruction Explain frost" + EOS.
    chain = {ids(":"): ids("Rewritten"), ids("Rewritten"): ids("instruction"), ids("instruction"): ids("Explain"),
             ids("Explain"): ids("frost")}
    lm = _chain_lm(len(tok), chain, eos=tok.eos_token_id)
    op, params = LLMOperator.create(lm, tok, operation_templates(OPERATIONS), max_len=16, max_new_tokens=8,
                                    temperature=0.0)
    b = seeds_from_texts(["Explain frost."], tok, 16)
    new_t, new_n, _ = op.apply(jax.random.key(0), jnp.zeros((1,), jnp.int32), b.tokens, b.lengths, params)
    jitted = decode(tok, np.asarray(new_t), np.asarray(new_n))[0]
    assert jitted == "Rewritten instruction Explain frost"  # the label words stay in the buffer
    assert clean_rewrite("Rewritten instruction: Explain frost") == "Explain frost"  # the text path strips it
