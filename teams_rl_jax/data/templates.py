"""Prompt templates: Alpaca (the paper's SFT format) and Vicuna v1.1 (the paper's reviewer/instructor chat).

A template turns an instruction (and optional input) into the prompt text; the response follows it
directly. Registry by name: ``format_prompt(name, instruction, input="")``.
"""

from __future__ import annotations

from teams_rl_jax.errors import ConfigError

# Stanford Alpaca's wording, verbatim (SFT on the paper's data uses it).
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# Vicuna v1.1 system prompt and roles.
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def format_alpaca(instruction: str, input: str = "") -> str:
    """Alpaca prompt (with the input block only when ``input`` is non-empty)."""
    if input and input.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def format_vicuna(instruction: str, input: str = "", history: list[tuple[str, str]] | None = None) -> str:
    """Vicuna v1.1 prompt ending in ``ASSISTANT:``; ``history`` holds earlier (user, assistant) turns."""
    parts = [VICUNA_SYSTEM]
    for user, assistant in history or []:
        parts.append(f"USER: {user} ASSISTANT: {assistant}</s>")
    user = instruction if not (input and input.strip()) else f"{instruction}\n\n{input}"
    parts.append(f"USER: {user} ASSISTANT:")
    return " ".join(parts)


TEMPLATES = {"alpaca": format_alpaca, "vicuna": format_vicuna}


def format_prompt(name: str, instruction: str, input: str = "") -> str:
    """Format with the template called ``name`` (``alpaca`` or ``vicuna``)."""
    if name not in TEMPLATES:
        raise ConfigError(f"unknown prompt template {name!r} (valid: {', '.join(TEMPLATES)})")
    return TEMPLATES[name](instruction, input)
