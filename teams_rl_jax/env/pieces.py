"""Token ids of a prompt template's fixed pieces, taken in context and verified.

The jitted env builds instructor and reviewer prompts from token pieces: ``piece_0 + slot_1 + piece_1
+ ... + slot_k + piece_k``, where each slot is an instruction buffer (ids of the instruction
tokenized on its own, no special tokens). Tokenizing each piece apart is wrong for real tokenizers:
SentencePiece (Llama-1/2 ``tokenizer.json``) prepends a word-start ``▁`` to every separately
encoded text and writes a word after a newline without one; Llama-3's byte-level regex merges
punctuation with the newlines after it (``".\\n"`` is one token) and a space with the next word
(``"Ġword"``). Concatenated apart-ids are then not the ids the model would see for the same text.

:func:`template_ids` therefore

1. renders the template with probe instructions, tokenizes the *whole* text (plus each answer,
   when the model's next token is read: the reviewer), and reads the piece ids off that encoding
   between the slots' own ids;
2. checks on every probe that ``pieces + slot ids`` equals the full encoding, token for token;
3. when it does not, tries other whitespace around the slots (``"\\n"``, ``"\\n "``, ``" \\n"`` ...:
   same meaning, but a boundary every tokenizer family splits at), and raises a one-line ConfigError
   naming the tokenizer when none works.

The answer ids (``" Equal"`` / ``" Not Equal"``) come from the encoding of prompt + answer minus the
prompt: the prompt ids are the common prefix of the encodings with each answer, and each answer's id
is the first token after it (``▁Equal`` after ``ASSISTANT:``, not a lone ``▁``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

from teams_rl_jax.data.tokenizer import front_special_ids
from teams_rl_jax.errors import ConfigError

# Instructions of different shapes (start: capital, digit, quote; end: period, question mark, word,
# closing quote, digit) so that a separator that only works for one shape is not chosen.
PROBES = (
    "Describe a city.",
    "What is 27 times 14?",
    '"Quote" this sentence and explain it',
    "List 3 uses of bamboo: food, paper, houses",
    "Explain why the sky is blue in 2024",
    "write a poem about the sea!",
)
# (before slot, after slot) whitespace tried in order; the template's own whitespace comes first.
SEPARATORS = (("\n", "\n"), ("\n ", "\n"), ("\n", " \n"), ("\n ", " \n"), (" ", " "), ("\n\n", "\n\n"))


@dataclasses.dataclass(frozen=True)
class TemplateIds:
    """Verified ids of a template's fixed pieces (``len(slots) + 1`` lists; ``pieces[0]`` holds BOS when
    the prompt starts with one), the answers' first ids (or None), and the text form used."""

    pieces: tuple[tuple[int, ...], ...]
    answers: tuple[int, ...] | None
    text_pieces: tuple[str, ...]
    separators: tuple[str, str]


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _with_bos(tokenizer, text: str, ids: list[int], add_bos: bool) -> list[int]:
    """``ids`` preceded by the tokenizer's own front specials (what ``tokenizer(text)`` adds: Llama's BOS, none
    for Qwen2) unless they already start it: the same rule as ``FlaxBackend.encode``, so the env's token
    prompts equal the text roles' (issue 19)."""
    front = list(front_special_ids(tokenizer)) if add_bos else []
    if front and ids[:len(front)] != front:
        return front + ids
    return ids


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return n


def answer_join(prompt: str) -> str:
    """What goes between a prompt and its answer: nothing after whitespace (chat templates end in
    ``"\\n\\n"``), else one space (Vicuna's ``"ASSISTANT:"`` is answered ``" Equal"``)."""
    return "" if not prompt or prompt[-1].isspace() else " "


def prompt_and_answer_ids(tokenizer, prompt: str, answers: Sequence[str], add_bos: bool = True):
    """``(prompt_ids, answer_first_ids)`` with every id read in context (see the module docstring).

    Raises ConfigError when the answers start with the same token or the prompt swallows an answer.
    """
    join = answer_join(prompt)
    fulls = [_with_bos(tokenizer, prompt, encode(tokenizer, prompt + join + a.strip()), add_bos) for a in answers]
    k = _common_prefix(fulls)
    if any(len(f) <= k for f in fulls):
        raise ConfigError(f"tokenizer {_name(tokenizer)}: answer {answers!r} adds no token after the prompt")
    firsts = tuple(int(f[k]) for f in fulls)
    if len(set(firsts)) != len(firsts):
        raise ConfigError(f"tokenizer {_name(tokenizer)}: answers {answers!r} start with the same token in context")
    return fulls[0][:k], firsts


def _name(tokenizer) -> str:
    return repr(getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__)


def _split_full(full: list[int], slot_ids: Sequence[list[int]]) -> list[list[int]] | None:
    """Pieces between the slots' ids in ``full`` (searched left to right), or None if a slot is missing."""
    pieces, pos = [], 0
    for ids in slot_ids:
        n = len(ids)
        at = next((i for i in range(pos, len(full) - n + 1) if full[i:i + n] == ids), None)
        if at is None or n == 0:
            return None
        pieces.append(full[pos:at])
        pos = at + n
    pieces.append(full[pos:])
    return pieces


def template_ids(tokenizer, render: Callable[[Sequence[str], tuple[str, str]], str], num_slots: int, *,
                 answers: Sequence[str] | None = None, add_bos: bool = True,
                 probes: Sequence[str] = PROBES, what: str = "prompt") -> TemplateIds:
    """Verified piece ids for a template with ``num_slots`` instruction slots.

    ``render(values, (before, after))`` returns the full prompt text with ``values`` in the slots and
    ``before``/``after`` as the whitespace around each slot. ``answers``: read the model's next token
    (the reviewer); the answers' first ids are returned and the last piece ends where they begin.
    """
    tried = []
    for seps in SEPARATORS:
        sets = [[probes[(i + j) % len(probes)] for j in range(num_slots)] for i in range(len(probes))]
        marker = [f"\x00{j}\x00" for j in range(num_slots)]
        marked = render(marker, seps)
        text_pieces = re.split("\x00\\d+\x00", marked)
        first_ids, ok, answer_ids = None, True, None
        for values in sets:
            text = render(values, seps)
            if answers:
                full, got = prompt_and_answer_ids(tokenizer, text, answers, add_bos)
                if answer_ids is not None and got != answer_ids:
                    ok = False
                    break
                answer_ids = got
            else:
                full = _with_bos(tokenizer, text, encode(tokenizer, text), add_bos)
            slot_ids = [encode(tokenizer, v) for v in values]
            if first_ids is None:
                first_ids = _split_full(full, slot_ids)
                if first_ids is None:
                    ok = False
                    break
            rebuilt = list(first_ids[0])
            for ids, piece in zip(slot_ids, first_ids[1:]):
                rebuilt += ids + list(piece)
            if rebuilt != full:
                ok = False
                break
        if ok and first_ids is not None:
            return TemplateIds(tuple(tuple(p) for p in first_ids), answer_ids, tuple(text_pieces), seps)
        tried.append(seps)
    raise ConfigError(f"tokenizer {_name(tokenizer)}: the {what} pieces tokenize differently apart than in the "
                      f"full prompt with every slot separator tried ({', '.join(repr(a + '|' + b) for a, b in tried)})")


def place_slots(template: str, slots: Sequence[str], seps: tuple[str, str]) -> str:
    """``template`` with the whitespace around each ``{slot}`` replaced by ``seps`` (the slot stays)."""
    out = template
    for name in slots:
        out = re.sub(r"[ \t]*\n?[ \t]*\{" + name + r"\}[ \t]*\n?", lambda m: seps[0] + "{" + name + "}" + seps[1], out)
    return out
