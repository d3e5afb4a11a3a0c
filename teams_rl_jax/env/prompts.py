"""The instructor's operation templates in the env's action order (for the jitted ``LLMOperator``).

The templates themselves and the text-level prompt builders live with the roles
(``teams_rl_jax.roles.prompts``); they are re-exported here for the env's callers.
"""

from __future__ import annotations

from typing import Sequence

from teams_rl_jax.env.operations import OPERATION_REGISTRY
from teams_rl_jax.roles.prompts import (OPERATION_PROMPTS, SLOT, Prompts, expert_messages,  # noqa: F401
                                        instructor_content, instructor_messages, instructor_prompt, render_prompt,
                                        template_pieces)


def operation_templates(names: Sequence[str], prompts: Prompts | None = None) -> list[tuple[str, str]]:
    """``(prefix, suffix)`` per operation, in action order (for ``LLMOperator.create``; ``prompts``: a
    loaded ``prompts:`` file, None: ours)."""
    return [template_pieces(OPERATION_REGISTRY.get(n).prompt, prompts) for n in names]
