"""The roles' prompts as text: the instructor's templates for the six operations (data; our own
wording) and the expert's question. (The reviewer's comparison prompt is in ``roles.reviewer``.)

Other wording comes from a ``prompts:`` YAML file (the pipeline's top-level ``prompts`` key;
:func:`load_prompts` -> :class:`Prompts`): ``operations`` maps each of the six operation names to a
template with one ``{instruction}`` placeholder, and ``judge`` is the reviewer's template with one
``{old}`` and one ``{new}``; no other ``{name}`` placeholder is allowed (other braces are text).
``configs/prompts/teams_rl_reference.yaml`` holds the TeaMs-RL reference code's wording.

Each template holds one ``{instruction}`` slot and ends where the instructor's answer (the rewritten
instruction) begins. The in-depth operations ask for 10 to 20 added words; breadth asks for a new,
rarer instruction in the same domain. Every template forbids copying its own marker words, which the
``template_copy`` elimination rule (``env.elimination``) catches when the instructor does it anyway.
Split a template with :func:`template_pieces`; ``env.prompts.operation_templates`` (templates in the
env's action order) feeds ``LLMOperator.create(lm, tokenizer, templates, ...)``, which wraps each in
the instructor's chat format.

Text-level builders for HTTP/text backends (the host env loop, the generate stage): each role's
prompt is a list of chat messages (:func:`instructor_messages`, :func:`expert_messages`,
``roles.reviewer.judge_messages``); a backend renders them with the checkpoint's chat template, or sends them
to ``/v1/chat/completions``. :func:`instructor_prompt` gives the rendered text for a tokenizer
(``data.chat.render_chat``: the template when the checkpoint has one, else Vicuna v1.1 wording);
:func:`render_prompt` is the user message's text alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from teams_rl_jax.data.chat import render_chat
from teams_rl_jax.errors import ConfigError
from teams_rl_jax.roles.reviewer import JUDGE_INSTRUCTION, JUDGE_SLOTS

_DEPTH_HEAD = (
    "You rewrite instructions for an AI assistant so that they become harder to answer well, while "
    "staying clear, self-contained and answerable by a person. Keep any tables, code or inputs of the "
    "original. Add only 10 to 20 words. Do not use the phrases 'original instruction', 'rewritten "
    "instruction', 'given prompt' or 'rewritten prompt' in your answer.\n"
)
_TAIL = "\nOriginal instruction:\n{instruction}\nRewritten instruction:\n"

OPERATION_PROMPTS: dict[str, str] = {
    "add_constraints": _DEPTH_HEAD
    + "Rewrite it by adding one more constraint or requirement that the answer must satisfy (a limit, "
    "a format, an audience, something to include or avoid)." + _TAIL,
    "deepening": _DEPTH_HEAD
    + "Rewrite it so that it asks for more depth: causes, trade-offs, competing views or long-term "
    "consequences of the question, rather than a surface answer." + _TAIL,
    "concretizing": _DEPTH_HEAD
    + "Rewrite it by replacing a general idea with a more specific one: a named example, place, "
    "period, product or person instead of a broad category." + _TAIL,
    "increase_reasoning_steps": _DEPTH_HEAD
    + "If the instruction can be solved with a few simple steps, rewrite it so that it explicitly "
    "requires several steps of reasoning, each building on the previous one." + _TAIL,
    "complicate_input": _DEPTH_HEAD
    + "Rewrite it so that it comes with a structured input the answer must use: a small table, a JSON "
    "object, a code snippet or a list of data, included in the instruction itself." + _TAIL,
    "breadth": (
        "You create new instructions for an AI assistant. Taking the instruction below as "
        "inspiration, write a brand-new instruction in the same domain that covers a rarer, "
        "less frequently asked topic. It should be about as long and as hard as the original, clear "
        "and answerable by a person. Do not use the phrases 'original instruction', 'new "
        "instruction', 'given prompt' or 'created prompt' in your answer.\n"
        "Original instruction:\n{instruction}\nNew instruction:\n"
    ),
}

SLOT = "{instruction}"
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")  # what counts as a placeholder: {name}


@dataclass(frozen=True, eq=False)
class Prompts:
    """The wording of the instructor's six operation templates (``{instruction}``) and of the
    reviewer's judge template (``{old}``, ``{new}``); ``source``: the file it came from, or ``ours``."""

    operations: Mapping[str, str] = field(default_factory=lambda: dict(OPERATION_PROMPTS))
    judge: str = JUDGE_INSTRUCTION
    source: str = "ours"


DEFAULT_PROMPTS = Prompts()
PROMPTS_KEYS = ("operations", "judge")


def _check_template(text, where: str, slots: tuple[str, ...]) -> str:
    """``text`` when it is a string with each of ``slots`` once and no other placeholder."""
    if not isinstance(text, str):
        raise ConfigError(f"{where}: expected a string template, got {type(text).__name__}")
    found = PLACEHOLDER.findall(text)
    for name in found:
        if name not in slots:
            raise ConfigError(f"{where}: unknown placeholder {{{name}}} (allowed: "
                              + ", ".join("{" + s + "}" for s in slots) + ")")
    for name in slots:
        if found.count(name) != 1:
            what = "missing placeholder" if name not in found else "placeholder used more than once:"
            raise ConfigError(f"{where}: {what} {{{name}}}")
    return text


def load_prompts(path: str | Path | None) -> Prompts:
    """The prompts of a ``prompts:`` YAML file (None: ours, :data:`DEFAULT_PROMPTS`).

    The file holds ``operations:`` (all six operation names -> a template with ``{instruction}``)
    and ``judge:`` (a template with ``{old}`` and ``{new}``). A missing file, a missing or unknown
    operation or key, or a template missing a placeholder (or with an unknown one) is a one-line
    ConfigError naming the file, the template and the placeholder.
    """
    if path is None:
        return DEFAULT_PROMPTS
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"prompts: file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping with keys {', '.join(PROMPTS_KEYS)}")
    for key in data:
        if key not in PROMPTS_KEYS:
            raise ConfigError(f"{p}: unknown key {key!r} (valid: {', '.join(PROMPTS_KEYS)})")
    ops = data.get("operations")
    if not isinstance(ops, dict):
        raise ConfigError(f"{p}: operations: expected a mapping of the six operation templates")
    for name in ops:
        if name not in OPERATION_PROMPTS:
            raise ConfigError(f"{p}: operations.{name}: unknown operation (valid: {', '.join(OPERATION_PROMPTS)})")
    for name in OPERATION_PROMPTS:
        if name not in ops:
            raise ConfigError(f"{p}: operations.{name}: missing template")
        _check_template(ops[name], f"{p}: operations.{name}", ("instruction",))
    if "judge" not in data:
        raise ConfigError(f"{p}: judge: missing template")
    judge = _check_template(data["judge"], f"{p}: judge", JUDGE_SLOTS)
    return Prompts({n: ops[n] for n in OPERATION_PROMPTS}, judge, str(p))


def template_pieces(name: str, prompts: Prompts | None = None) -> tuple[str, str]:
    """``(prefix, suffix)`` around the instruction slot of operation ``name``'s template (``prompts``:
    a loaded ``prompts:`` file; None: ours)."""
    templates = (prompts or DEFAULT_PROMPTS).operations
    try:
        template = templates[name]
    except KeyError:
        raise ConfigError(f"no prompt template for operation {name!r} (have: {', '.join(templates)})") from None
    if template.count(SLOT) != 1:
        raise ConfigError(f"prompt template for {name!r} must contain {SLOT} exactly once")
    prefix, suffix = template.split(SLOT)
    return prefix, suffix


def instructor_content(name: str, instruction: str, prompts: Prompts | None = None) -> str:
    """The instructor's user message for operation ``name`` applied to ``instruction`` (the template's
    own text kept as written, the assembled message's outer whitespace stripped)."""
    prefix, suffix = template_pieces(name, prompts)
    return (prefix + instruction.strip() + suffix).strip()


def instructor_messages(name: str, instruction: str, prompts: Prompts | None = None) -> list[dict[str, str]]:
    """Chat messages asking the instructor to apply operation ``name`` to ``instruction``."""
    return [{"role": "user", "content": instructor_content(name, instruction, prompts)}]


def expert_messages(instruction: str, input: str = "") -> list[dict[str, str]]:
    """Chat messages asking the expert to answer ``instruction`` (its ``input`` after a blank line)."""
    text = instruction.strip() + (f"\n\n{input.strip()}" if input and input.strip() else "")
    return [{"role": "user", "content": text}]


def render_prompt(name: str, instruction: str, prompts: Prompts | None = None) -> str:
    """The instructor's request for operation ``name`` on ``instruction`` (the user message's text, no
    chat wrapping: send it as a message, or wrap it with :func:`instructor_prompt`)."""
    return instructor_content(name, instruction, prompts)


def instructor_prompt(name: str, instruction: str, tokenizer=None, prompts: Prompts | None = None) -> str:
    """The full instructor prompt text in ``tokenizer``'s chat format (None: Vicuna v1.1 wording)."""
    return render_chat(tokenizer, instructor_messages(name, instruction, prompts))
