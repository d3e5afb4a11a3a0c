"""The instructor on text: asks for an Evol-Instruct operation, cleans the reply, flags truncation.

One class for every stage: the policy stage's host env loop (``env.host_roles.HostOperator``) and the
generate stage (its ``LLMRewriter``) both call :meth:`Instructor.rewrite`. The prompt is the
operation's template (``roles.prompts``) as one user message (the backend renders it: the
checkpoint's chat template, ``/v1/chat/completions``, or Vicuna v1.1 wording for ``chat: false``).
The jitted in-process operator (``env.llm_operator``) assembles the same templates from token ids
inside jit and keeps the reply as generated: it does not strip a leading label line (see its
module docstring and ``tests/test_instructor.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from teams_rl_jax.roles.prompts import instructor_messages
from teams_rl_jax.errors import BackendError

# Label lines an instructor may put before its rewrite (ours and WizardLM's template markers).
LABELS = ("Rewritten instruction:", "New instruction:", "#Rewritten Prompt#:", "#Rewritten Prompt#")


def clean_rewrite(text: str) -> str:
    """The rewritten instruction from a reply: trimmed, without a leading label line."""
    text = text.strip()
    for label in LABELS:
        if text.lower().startswith(label.lower()):
            text = text[len(label):].strip()
    return text


@dataclasses.dataclass(frozen=True)
class InstructorReply:
    """One instructor answer: the cleaned ``text``; ``truncated`` when the reply was cut by
    ``max_new_tokens`` (``finish_reason == "length"``); ``served_tokens``: the cleaned text's length in
    the served model's tokens (the reply's ``completion_tokens``, scaled by the characters kept when a
    label line was stripped; None when the backend does not say)."""

    text: str
    truncated: bool
    served_tokens: int | None = None


def _served(raw: str, clean: str, tokens: int | None) -> int | None:
    if tokens is None:
        return None
    raw = raw.strip()
    if clean == raw or not raw:
        return int(tokens)
    return max(1, round(tokens * len(clean) / len(raw))) if clean else 0


@dataclasses.dataclass(frozen=True, eq=False)
class Instructor:
    """The instructor role behind any backend: ``rewrite(texts, ops, seed)`` -> one :class:`InstructorReply` per row."""

    backend: Any
    max_new_tokens: int
    temperature: float = 0.7
    top_p: float = 0.95
    prompts: Any = None  # roles.prompts.Prompts of a ``prompts:`` file; None: our wording

    @property
    def role(self) -> str:
        return getattr(self.backend, "role", "instructor")

    def rewrite(self, texts: Sequence[str], ops: Sequence[str], seed: int | None = None) -> list[InstructorReply]:
        """One batched ``complete`` (one query per row) for operation ``ops[i]`` on ``texts[i]``."""
        if not texts:
            return []
        prompts = [instructor_messages(op, text, self.prompts) for op, text in zip(ops, texts)]
        outs = self.backend.complete(prompts, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                     top_p=self.top_p, seed=seed)
        if len(outs) != len(prompts):
            raise BackendError(f"{self.role} returned {len(outs)} completions for {len(prompts)} prompts")
        out = []
        for c in outs:
            text = clean_rewrite(c.text)
            out.append(InstructorReply(text, c.finish_reason == "length", _served(c.text, text, c.completion_tokens)))
        return out
