"""The roles' prompts as text: the instructor's templates for the six operations (data; our own
wording) and the expert's question. (The reviewer's comparison prompt is in ``roles.reviewer``.)

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


from teams_rl_jax.errors import ConfigError

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


def template_pieces(name: str) -> tuple[str, str]:
    """``(prefix, suffix)`` around the instruction slot of operation ``name``'s template."""
    try:
        template = OPERATION_PROMPTS[name]
    except KeyError:
        raise ConfigError(f"no prompt template for operation {name!r} (have: {', '.join(OPERATION_PROMPTS)})") from None
    if template.count(SLOT) != 1:
        raise ConfigError(f"prompt template for {name!r} must contain {SLOT} exactly once")
    prefix, suffix = template.split(SLOT)
    return prefix, suffix


def instructor_content(name: str, instruction: str) -> str:
    """The instructor's user message for operation ``name`` applied to ``instruction``."""
    prefix, suffix = template_pieces(name)
    return (prefix + instruction.strip() + suffix).strip()


def instructor_messages(name: str, instruction: str) -> list[dict[str, str]]:
    """Chat messages asking the instructor to apply operation ``name`` to ``instruction``."""
    return [{"role": "user", "content": instructor_content(name, instruction)}]


def expert_messages(instruction: str, input: str = "") -> list[dict[str, str]]:
    """Chat messages asking the expert to answer ``instruction`` (its ``input`` after a blank line)."""
    text = instruction.strip() + (f"\n\n{input.strip()}" if input and input.strip() else "")
    return [{"role": "user", "content": text}]


def render_prompt(name: str, instruction: str) -> str:
    """The instructor's request for operation ``name`` on ``instruction`` (the user message's text, no
    chat wrapping: send it as a message, or wrap it with :func:`instructor_prompt`)."""
    return instructor_content(name, instruction)


def instructor_prompt(name: str, instruction: str, tokenizer=None) -> str:
    """The full instructor prompt text in ``tokenizer``'s chat format (None: Vicuna v1.1 wording)."""
    from teams_rl_jax.data.chat import render_chat

    return render_chat(tokenizer, instructor_messages(name, instruction))
