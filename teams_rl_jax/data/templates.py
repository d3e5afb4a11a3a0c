"""Prompt templates: Alpaca (the paper's SFT format) and Vicuna v1.1 (the paper's reviewer/instructor chat).

One module owns both wordings, for the SFT data and for the env's reviewer/instructor prompts.

* Alpaca: Stanford Alpaca's ``PROMPT_DICT`` verbatim (``train.py``). The prompt ends in
  ``"### Response:"`` and the answer follows directly (Stanford trains on ``source + target``).
  The input block is used when ``input`` is a non-empty string, as in Stanford's code.
* Vicuna v1.1: FastChat's ``vicuna_v1.1`` conversation (``SeparatorStyle.ADD_COLON_TWO``, ``sep=" "``,
  ``sep2="</s>"``): ``"{system} USER: {u1} ASSISTANT: {a1}</s>USER: {u2} ASSISTANT:"``.

A template gives two views of an example, kept consistent by construction:
``prompt(...)`` is the text a model is asked to continue at inference, and ``pieces(...)`` is the
training text as ``(text, is_response)`` pieces whose concatenation is ``prompt + response``.
Registry by name: :func:`get_template`, :func:`format_prompt`. ``chat`` is registered here too but
renders with a tokenizer's Jinja chat template (:mod:`teams_rl_jax.data.chat_sft`), so it has no
text-only ``prompt``/``pieces`` (they raise ConfigError).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from teams_rl_jax.errors import ConfigError

# Stanford Alpaca's wording, verbatim.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
# FastChat's vicuna_v1.1 system prompt, roles and separators.
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_ROLES = ("USER", "ASSISTANT")
VICUNA_SEP, VICUNA_SEP2 = " ", "</s>"

_USER_ROLES = ("user", "human")
_ASSISTANT_ROLES = ("assistant", "gpt")

Turns = Sequence[tuple[str, str]]  # earlier (user, assistant) exchanges


def format_alpaca(instruction: str, input: str = "") -> str:
    """Alpaca prompt, ending in ``### Response:``; the input block only when ``input`` is non-empty."""
    if input:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def _vicuna_user_text(instruction: str, input: str) -> str:
    # Vicuna has no input slot: the input follows the instruction after a blank line.
    return f"{instruction}\n\n{input}" if input else instruction


def _normalize_messages(messages: Sequence[Any]) -> list[tuple[str, str]]:
    """``(role, text)`` pairs from tuples or dicts (``role``/``from`` + ``content``/``value``)."""
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict):
            role, text = m.get("role", m.get("from")), m.get("content", m.get("value"))
        else:
            role, text = m
        role = str(role).lower()
        if role not in _USER_ROLES + _ASSISTANT_ROLES:
            raise ValueError(f"message {i}: role must be user/assistant, got {role!r}")
        out.append(("user" if role in _USER_ROLES else "assistant", text))
    return out


def format_vicuna(instruction: str | Sequence[Any], input: str = "", history: Turns | None = None, *,
                  system: str | None = None, eos: str = VICUNA_SEP2) -> str:
    """Vicuna v1.1 conversation text.

    ``instruction`` is either the user's text (then ``input`` is appended after a blank line and
    ``history`` holds earlier ``(user, assistant)`` exchanges) or a list of messages, as
    ``(role, text)`` tuples or ``{"role", "content"}`` dicts alternating user/assistant. The text ends in
    ``"ASSISTANT:"`` when the last message is the user's (a prompt); after a final assistant message it
    ends in ``eos`` (a finished conversation). ``system`` replaces the default Vicuna system prompt.
    """
    if isinstance(instruction, str):
        messages = [m for u, a in (history or ()) for m in (("user", u), ("assistant", a))]
        messages.append(("user", _vicuna_user_text(instruction, input)))
    else:
        if input or history:
            raise ValueError("format_vicuna: pass input/history only with a user text, not with messages")
        messages = _normalize_messages(instruction)
    text = (VICUNA_SYSTEM if system is None else system) + VICUNA_SEP
    for i, (role, msg) in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"message {i}: expected role {expected}, got {role} (turns alternate user/assistant)")
        name = VICUNA_ROLES[i % 2]
        text += f"{name}: {msg}" + (VICUNA_SEP if i % 2 == 0 else eos)
    if messages and messages[-1][0] == "user":
        text = text[: -len(VICUNA_SEP)] + f" {VICUNA_ROLES[1]}:"
    return text


def alpaca_pieces(instruction: str, input: str, output: str, history: Turns = (), system: str | None = None,
                  eos: str = VICUNA_SEP2) -> list[tuple[str, bool]]:
    """Training text as ``[(prompt, False), (output, True)]``. Alpaca has no chat turns: ``history``
    must be empty; ``system`` and ``eos`` are ignored (the EOS token is appended by the tokenizer step)."""
    if history:
        raise ConfigError("template 'alpaca' has no chat turns; use template 'vicuna' for multi-turn data")
    return [(format_alpaca(instruction, input), False), (output, True)]


def vicuna_pieces(instruction: str, input: str, output: str, history: Turns = (), system: str | None = None,
                  eos: str = VICUNA_SEP2) -> list[tuple[str, bool]]:
    """Training text of a Vicuna conversation; every assistant reply (with the space after
    ``ASSISTANT:``, and ``eos`` after earlier replies) is a response piece, as in FastChat's training."""
    pieces: list[tuple[str, bool]] = []
    prefix = (VICUNA_SYSTEM if system is None else system) + VICUNA_SEP
    for user, assistant in history:
        pieces.append((prefix + f"{VICUNA_ROLES[0]}: {user}{VICUNA_SEP}{VICUNA_ROLES[1]}:", False))
        pieces.append((f" {assistant}{eos}", True))
        prefix = ""
    pieces.append((prefix + f"{VICUNA_ROLES[0]}: {_vicuna_user_text(instruction, input)}{VICUNA_SEP}"
                   f"{VICUNA_ROLES[1]}:", False))
    pieces.append((f" {output}", True))
    return pieces


def _alpaca_prompt(instruction: str, input: str = "", history: Turns = (), system: str | None = None,
                   eos: str = VICUNA_SEP2) -> str:
    if history:
        raise ConfigError("template 'alpaca' has no chat turns; use template 'vicuna' for multi-turn data")
    return format_alpaca(instruction, input)


def _vicuna_prompt(instruction: str, input: str = "", history: Turns = (), system: str | None = None,
                   eos: str = VICUNA_SEP2) -> str:
    return format_vicuna(instruction, input, history, system=system, eos=eos)


def _chat_text_only(*args, **kwargs):
    raise ConfigError("template 'chat' renders with the tokenizer's chat template (tokenize_dataset / "
                      "teams_rl_jax.data.chat.render_chat); it has no tokenizer-free text form")


@dataclasses.dataclass(frozen=True)
class Template:
    """A named prompt format: ``prompt`` (inference text) and ``pieces`` (training text with response marks).

    Both take ``(instruction, input, [output,] history, system, eos)``; ``"".join(pieces)`` equals
    ``prompt(...)`` followed by the final response piece.
    """

    name: str
    prompt: Callable[..., str]
    pieces: Callable[..., list[tuple[str, bool]]]
    multi_turn: bool


TEMPLATES = {
    "alpaca": Template("alpaca", _alpaca_prompt, alpaca_pieces, multi_turn=False),
    "vicuna": Template("vicuna", _vicuna_prompt, vicuna_pieces, multi_turn=True),
    # the tokenizer's (or sft.data.chat_template's) Jinja chat template: see teams_rl_jax.data.chat_sft
    "chat": Template("chat", _chat_text_only, _chat_text_only, multi_turn=True),
}


def get_template(name: str) -> Template:
    """The template called ``name``; ConfigError naming the valid choices otherwise."""
    if name not in TEMPLATES:
        raise ConfigError(f"unknown prompt template {name!r} (valid: {', '.join(TEMPLATES)})")
    return TEMPLATES[name]


def format_prompt(name: str, instruction: str, input: str = "", history: Turns = (), *,
                  system: str | None = None) -> str:
    """Inference prompt for ``instruction`` (+ ``input``, chat ``history``) under template ``name``."""
    return get_template(name).prompt(instruction, input, tuple(history), system)
