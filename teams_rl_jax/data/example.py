"""The SFT record (:class:`Example`) and the field check every reader shares.

Its own module so the readers (``readers``, ``tfds_io``, ``seeds``) import it from below rather than
from each other.
"""

from __future__ import annotations

import dataclasses

from teams_rl_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class Example:
    """One SFT example: instruction (+ optional input, chat history, system prompt) and the target output."""

    instruction: str
    output: str
    input: str = ""
    history: tuple[tuple[str, str], ...] = ()  # earlier (user, assistant) exchanges
    meta: dict | None = None
    system: str | None = None  # chat system prompt (Vicuna's default when None)


def require_str(obj: dict, key: str, where: str, required: bool, nonempty: bool) -> str:
    """``obj[key]`` as a string; DataError naming ``where`` if missing (when required), not a string, or empty."""
    if key not in obj or obj[key] is None:
        if required:
            raise DataError(f"{where}: missing field '{key}'")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return value
