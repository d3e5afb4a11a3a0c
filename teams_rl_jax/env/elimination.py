"""WizardLM's four elimination rules, as text checks (generate stage) and as jnp checks on buffers (env).

1. ``no_gain``: the evolution brought no information gain. Text: the reviewer judged "Equal"
   (``judge_equal=True``) or the two instructions are the same words and punctuation. Buffers: the
   token buffers are identical, or the reviewer judge (the reward term with ``role="reviewer"``,
   read as ``P(Not Equal)``) scored below 0.5.
2. ``sorry_short``: contains "sorry" and has fewer than ``sorry_max_words`` (80) words.
3. ``stopwords_only``: only punctuation and stop words (or empty).
4. ``template_copy``: the new text copies prompt-template words ("given prompt", "rewritten
   prompt", "#Rewritten Prompt#", our own markers ...), wherever they stand (after a space, a
   newline, "#" ...).

Rules 2 and 3 judge WizardLM's *response*: the expert's answer to the evolved instruction ("the
evolved instruction makes it difficult for the LLM to generate a response"). The generate stage has
that answer and applies them to it (:func:`eliminate_text` with ``answer=``). The env has no expert
answer inside its step (one more LLM query per step), so there rules 2-3 run on the evolved
*instruction* as a proxy: an instructor that replies "Sorry, I can't" or with filler instead of an
instruction is what they catch there.

A fifth rule, ``truncated``, is ours: the instructor's rewrite was cut by ``max_new_tokens`` or by the
buffer (no EOS), so it is not a finished instruction (``LLMOperator.rewrite`` flags it; text backends
report ``finish_reason == "length"``).

:func:`eliminate` ``(old, new) -> reason or None`` is the generate stage's filter
(:func:`eliminate_text` gives every rule's verdict). In the env a rule is
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
from teams_rl_jax.env.buffers import Instruction, NgramSet, build_ngram_set, encode, ngram_any, phrase_variants
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
    variants = [template_variants(tokenizer, p) for p in template_phrases]
    sorry_variants = [phrase_variants(tokenizer, phrases.SORRY_WORD)]
    return VocabTables(stop=jnp.asarray(stop), sorry=jnp.asarray(sorry), word_start=jnp.asarray(start),
                       alnum=jnp.asarray(alnum), marker=jnp.asarray(marker), template=build_ngram_set(variants),
                       sorry_phrase=build_ngram_set(sorry_variants),
                       sorry_max_words=jnp.asarray(sorry_max_words, jnp.int32))


# Characters a template phrase may follow in an instruction (prompts write "#Rewritten Prompt#", a
# phrase on a new line, "**Rewritten instruction:**" ...).
_PHRASE_CONTEXTS = ("Note ", "Note\n", "Note\n\n", "Note #", "Note \"", "Note (", "Note *", "Note: ", "Note:\n")


def template_variants(tokenizer, phrase: str) -> list[list[int]]:
    """Token-id variants of ``phrase`` as it is tokenized in context: alone, and after each of
    ``_PHRASE_CONTEXTS`` (a word, a newline, "#", a quote ...), in lower/Title/Capitalized/UPPER case.

    Subword vocabularies mark word starts (``▁word``, ``Ġword``) and drop the mark after a newline or
    "#", so the variant tokenized alone misses "\n#Rewritten Prompt#" (issue 7, defect 6). A context
    whose last token merges with the phrase's first is skipped (no clean boundary to cut at).
    """
    out = phrase_variants(tokenizer, phrase)
    unk = getattr(tokenizer, "unk_token_id", None)
    cases = dict.fromkeys([phrase, phrase.lower(), phrase.title(), phrase[:1].upper() + phrase[1:], phrase.upper()])
    for ctx in _PHRASE_CONTEXTS:
        pre = encode(tokenizer, ctx)
        for t in cases:
            full = encode(tokenizer, ctx + t)
            if len(full) > len(pre) and full[: len(pre)] == pre:
                ids = full[len(pre):]
                if ids not in out and (unk is None or unk not in ids):
                    out.append(ids)
    return out


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
    """Copies a template marker phrase (case-insensitive; after any character: "#Rewritten Prompt#")."""
    return any(r.search(new) for r in _TEMPLATE_RES)


def text_truncated(old: str, new: str, truncated: bool = False) -> bool:
    """The rewrite was cut by the token limit (``finish_reason == "length"``), not finished."""
    return bool(truncated)


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
    """A tokenization variant of a template phrase occurs in the buffer (variants in several contexts:
    alone, after a word, a newline, "#", a quote ...; see :func:`template_variants`)."""
    return ngram_any(after.tokens, after.length, tables.template)


def tokens_truncated(before: Instruction, after: Instruction, tables: VocabTables, aux: dict) -> jax.Array:
    """The operator flagged the rewrite as cut by ``max_new_tokens`` or the buffer (``aux["truncated"]``)."""
    return jnp.asarray(aux.get("truncated", False), bool)


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
register_rule("truncated", text_truncated, tokens_truncated)

WIZARDLM_RULES = ("no_gain", "sorry_short", "stopwords_only", "template_copy")
RESPONSE_RULES = ("sorry_short", "stopwords_only")  # WizardLM applies these to the expert's answer
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


def eliminate_text(old: str, new: str, answer: str | None = None, *, judge_equal: bool | None = None,
                   truncated: bool = False, sorry_max_words: int = SORRY_MAX_WORDS,
                   rules: Sequence[str] | None = None) -> dict[str, bool]:
    """Every rule's verdict ``{rule: bool}`` for evolving ``old`` into ``new`` (True = eliminate).

    ``answer``: the expert's response to ``new``; rules 2-3 (``sorry_short``, ``stopwords_only``) judge
    it, as in WizardLM. Without it they judge ``new`` itself (the env's proxy). ``judge_equal``: the
    reviewer's verdict (True = "Equal"); ``truncated``: the rewrite hit the token limit.
    """
    out = {}
    for name in rules if rules is not None else DEFAULT_RULES:
        rule = ELIMINATION_RULES.get(name)
        target = answer if (answer is not None and name in RESPONSE_RULES) else new
        if name == "no_gain":
            out[name] = bool(rule.text(old, new, judge_equal=judge_equal))
        elif name == "sorry_short":
            out[name] = bool(rule.text(old, target, max_words=sorry_max_words))
        elif name == "truncated":
            out[name] = bool(rule.text(old, new, truncated=truncated))
        else:
            out[name] = bool(rule.text(old, target))
    return out


def eliminated_tokens(before: Instruction, after: Instruction, tables: VocabTables, rules: Sequence[str],
                      aux: dict[str, Any] | None = None) -> dict[str, jax.Array]:
    """``{rule: bool}`` for one buffer pair (vmap for batches)."""
    aux = aux or {}
    return {name: ELIMINATION_RULES.get(name).tokens(before, after, tables, aux) for name in rules}
