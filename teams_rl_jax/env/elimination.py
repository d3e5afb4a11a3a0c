"""WizardLM's four elimination rules, as text checks (generate stage) and as jnp checks on buffers (env).

1. ``no_gain``: the evolution brought no information gain. Text: the reviewer judged "Equal"
   (``judge_equal=True``) or the two instructions are the same words and punctuation. Buffers: the
   token buffers are identical, or the reviewer judge (the reward term with ``role="reviewer"``,
   read as ``P(Not Equal)``) scored below 0.5.
2. ``sorry_short``: the new text contains "sorry" and has fewer than ``sorry_max_words`` (80) words.
3. ``stopwords_only``: the new text is only punctuation and stop words (or empty).
4. ``template_copy``: the new text copies prompt-template words ("given prompt", "rewritten
   prompt", "#Rewritten Prompt#", our own markers ...).

:func:`eliminate` ``(old, new) -> reason or None`` is the generate stage's filter. In the env a rule is
a per-buffer jnp function ``(before, after, tables, aux) -> bool``; vocabulary facts (stop word?
contains "sorry"? starts a word?) are per-token-id tables built once from the tokenizer
(:func:`build_vocab_tables`), and phrases are found by token n-gram search. The two versions agree
for word-level tokenizers; with subword tokenizers the buffer checks are close approximations
(counts of words, phrases split differently), and the text checks stay authoritative for filtering.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import flax.struct as struct
import jax
import jax.numpy as jnp
import numpy as np

from teams_rl_jax.env import phrases
from teams_rl_jax.env.buffers import Instruction, NgramSet, build_ngram_set, ngram_any, phrase_variants
from teams_rl_jax.env.registry import Registry

SORRY_MAX_WORDS = 80
_MARKERS = ("Ġ", "▁")  # word-start markers of byte-level BPE and SentencePiece vocabularies


@struct.dataclass
class VocabTables:
    """Per-token-id facts ``bool [V]`` and template-phrase n-grams, built once per tokenizer."""

    stop: jax.Array  # content-free: stop word, punctuation, special token
    sorry: jax.Array  # token text contains "sorry"
    word_start: jax.Array  # token starts a word
    alnum: jax.Array  # token has a letter or digit (a word even without a start marker, at position 0)
    marker: jax.Array  # token is a bare word-start marker ("Ġ", "▁"): the next token starts a word
    template: NgramSet
    sorry_phrase: NgramSet  # tokenizations of "sorry" (a subword vocabulary may split it)
    sorry_max_words: jax.Array  # int32 []


def _token_texts(tokenizer) -> list[str]:
    vocab = len(tokenizer)
    return [t if isinstance(t, str) else "" for t in tokenizer.convert_ids_to_tokens(list(range(vocab)))]


def build_vocab_tables(tokenizer, sorry_max_words: int = SORRY_MAX_WORDS,
                       template_phrases: Sequence[str] = phrases.TEMPLATE_PHRASES) -> VocabTables:
    """Tables for the buffer checks, from any Hugging Face tokenizer (one pass over its vocabulary)."""
    texts = _token_texts(tokenizer)
    marker_style = sum(t.startswith(_MARKERS) for t in texts) > 0.1 * max(len(texts), 1)
    special = set(tokenizer.all_special_ids)
    V = len(texts)
    stop, sorry, start, alnum, marker = (np.zeros(V, bool) for _ in range(5))
    for i, raw in enumerate(texts):
        bare = raw.lstrip("".join(_MARKERS)).removeprefix("##")
        low = bare.lower()
        has_alnum = any(c.isalnum() for c in bare)
        alnum[i] = has_alnum and i not in special
        stop[i] = i in special or not has_alnum or low in phrases.STOPWORDS
        sorry[i] = phrases.SORRY_WORD in low
        start[i] = alnum[i] and (raw.startswith(_MARKERS) if marker_style else not raw.startswith("##"))
        marker[i] = marker_style and raw != "" and bare == ""
    variants = [phrase_variants(tokenizer, p) for p in template_phrases]
    sorry_variants = [phrase_variants(tokenizer, phrases.SORRY_WORD)]
    return VocabTables(stop=jnp.asarray(stop), sorry=jnp.asarray(sorry), word_start=jnp.asarray(start),
                       alnum=jnp.asarray(alnum), marker=jnp.asarray(marker), template=build_ngram_set(variants),
                       sorry_phrase=build_ngram_set(sorry_variants),
                       sorry_max_words=jnp.asarray(sorry_max_words, jnp.int32))


def word_count(tokens: jax.Array, length: jax.Array, tables: VocabTables) -> jax.Array:
    """Approximate number of words in ``tokens[:length]`` (``int32 []``)."""
    pos = jnp.arange(tokens.shape[-1])
    after_marker = jnp.concatenate([jnp.zeros((1,), bool), jnp.take(tables.marker, tokens[:-1])])
    is_word = jnp.take(tables.word_start, tokens) | (((pos == 0) | after_marker) & jnp.take(tables.alnum, tokens))
    return jnp.sum(is_word & (pos < length)).astype(jnp.int32)


# ----------------------------------------------------------------------------------------- text rules
# Words are letter/digit runs; "_" counts as punctuation (as in the word-level tokenizer).
_WORDS = re.compile(r"[^\W_]+")
_PIECES = re.compile(r"[^\W_]+|[^\w\s]|_")


def _pieces(text: str) -> list[str]:
    return _PIECES.findall(text)


def _phrase_regex(phrase: str) -> re.Pattern:
    parts = [re.escape(p) for p in _pieces(phrase)]
    body = r"\s*".join(parts)
    head = r"\b" if _pieces(phrase)[0][0].isalnum() else ""
    return re.compile(head + body, re.IGNORECASE)


_TEMPLATE_RES = [_phrase_regex(p) for p in phrases.TEMPLATE_PHRASES]


def text_no_gain(old: str, new: str, judge_equal: bool | None = None) -> bool:
    """No information gain: the judge said Equal, or the same words and punctuation."""
    return bool(judge_equal) or _pieces(old) == _pieces(new)


def text_sorry_short(old: str, new: str, max_words: int = SORRY_MAX_WORDS) -> bool:
    """Contains "sorry" and has fewer than ``max_words`` words."""
    return phrases.SORRY_WORD in new.lower() and len(_WORDS.findall(new)) < max_words


def text_stopwords_only(old: str, new: str) -> bool:
    """Only punctuation and stop words (an empty text counts)."""
    return all(w.lower() in phrases.STOPWORDS for w in _WORDS.findall(new))


def text_template_copy(old: str, new: str) -> bool:
    """Copies a template marker phrase (case-insensitive)."""
    return any(r.search(new) for r in _TEMPLATE_RES)


# --------------------------------------------------------------------------------------- buffer rules
def tokens_no_gain(before: Instruction, after: Instruction, tables: VocabTables, aux: dict) -> jax.Array:
    """Identical buffers, or the reviewer judge's ``P(Not Equal)`` (``aux["judge"]``) below 0.5."""
    same = (before.length == after.length) & jnp.all(before.tokens == after.tokens)
    judge = aux.get("judge")
    return same | (judge < 0.5) if judge is not None else same


def tokens_sorry_short(before: Instruction, after: Instruction, tables: VocabTables, aux: dict) -> jax.Array:
    """A "sorry" token and fewer than ``tables.sorry_max_words`` words."""
    valid = jnp.arange(after.tokens.shape[-1]) < after.length
    has_sorry = jnp.any(jnp.take(tables.sorry, after.tokens) & valid) | ngram_any(after.tokens, after.length,
                                                                                  tables.sorry_phrase)
    return has_sorry & (word_count(after.tokens, after.length, tables) < tables.sorry_max_words)


def tokens_stopwords_only(before: Instruction, after: Instruction, tables: VocabTables, aux: dict) -> jax.Array:
    """Every token is content-free (stop word, punctuation, special), or the buffer is empty."""
    valid = jnp.arange(after.tokens.shape[-1]) < after.length
    return jnp.all(jnp.take(tables.stop, after.tokens) | ~valid)


def tokens_template_copy(before: Instruction, after: Instruction, tables: VocabTables, aux: dict) -> jax.Array:
    """A tokenization variant of a template phrase occurs in the buffer."""
    return ngram_any(after.tokens, after.length, tables.template)


@dataclasses.dataclass(frozen=True)
class EliminationRule:
    """A rule's two forms: ``text(old, new) -> bool`` and ``tokens(before, after, tables, aux) -> bool``."""

    name: str
    text: Callable[..., bool]
    tokens: Callable[[Instruction, Instruction, VocabTables, dict], jax.Array]


ELIMINATION_RULES: Registry[EliminationRule] = Registry("elimination rule")


def register_rule(name: str, text: Callable[..., bool], tokens: Callable[..., jax.Array]) -> EliminationRule:
    """Register (or replace) elimination rule ``name``."""
    return ELIMINATION_RULES.register(name, EliminationRule(name, text, tokens))


register_rule("no_gain", text_no_gain, tokens_no_gain)
register_rule("sorry_short", text_sorry_short, tokens_sorry_short)
register_rule("stopwords_only", text_stopwords_only, tokens_stopwords_only)
register_rule("template_copy", text_template_copy, tokens_template_copy)

DEFAULT_RULES = ELIMINATION_RULES.names()


def eliminate(old: str, new: str, rules: Sequence[str] | None = None, *, judge_equal: bool | None = None,
              sorry_max_words: int = SORRY_MAX_WORDS) -> str | None:
    """Name of the first elimination rule ``new`` fails (an evolution of ``old``), or None to keep it.

    ``judge_equal``: the reviewer's verdict when one was asked (True = "Equal" = no information gain).
    """
    for name in rules if rules is not None else DEFAULT_RULES:
        rule = ELIMINATION_RULES.get(name)
        if name == "no_gain":
            hit = rule.text(old, new, judge_equal=judge_equal)
        elif name == "sorry_short":
            hit = rule.text(old, new, max_words=sorry_max_words)
        else:
            hit = rule.text(old, new)
        if hit:
            return name
    return None


def eliminated_tokens(before: Instruction, after: Instruction, tables: VocabTables, rules: Sequence[str],
                      aux: dict[str, Any] | None = None) -> dict[str, jax.Array]:
    """``{rule: bool}`` for one buffer pair (vmap for batches)."""
    aux = aux or {}
    return {name: ELIMINATION_RULES.get(name).tokens(before, after, tables, aux) for name in rules}
