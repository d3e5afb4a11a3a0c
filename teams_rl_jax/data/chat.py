"""Chat prompts in the checkpoint's own format.

Every role (instructor, reviewer, expert) speaks to its model the way that model was tuned: with the
tokenizer's ``chat_template`` (``tokenizer.apply_chat_template``) when the checkpoint ships one, and
otherwise with FastChat's Vicuna v1.1 wording (the paper's models are Vicuna/Llama-2 chat; base Llama
checkpoints ship no template). One function, so the env, the backends and the server agree.
"""

from __future__ import annotations

from typing import Any, Sequence

from teams_rl_jax.data.templates import format_vicuna


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` carries a chat template of its own."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
    """Prompt text for ``messages`` (``[{"role", "content"}, ...]``), ending where the assistant speaks.

    The text includes the template's own BOS where the template writes one; tokenize it with
    ``add_special_tokens=False`` so BOS is not doubled (see :func:`chat_adds_bos`).
    """
    if tokenizer is not None and has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    system = next((m["content"] for m in messages if m.get("role") == "system"), None)
    turns = [m for m in messages if m.get("role") != "system"]
    return format_vicuna(turns, system=system)  # Vicuna wording always ends with " ASSISTANT:"


def chat_adds_bos(tokenizer) -> bool:
    """Whether :func:`render_chat`'s text already starts with the tokenizer's BOS token text."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos:
        return False
    return render_chat(tokenizer, [{"role": "user", "content": "x"}]).startswith(bos)
