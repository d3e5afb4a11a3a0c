"""The one protocol every LLM role speaks (instructor, reviewer, expert).

A backend turns a batch of prompts into completions. Prompts are either plain text (sent as-is:
``/v1/completions`` or an in-process generate over the tokenized text) or chat messages
(``[{"role": "user", "content": ...}, ...]``: ``/v1/chat/completions``, or the checkpoint's own
chat template in-process). Every prompt in a ``complete`` call is one counted query of the
backend's role; ``QueryCounter`` keeps the tally by role.

Implementations: ``backends.flax_backend.FlaxBackend`` (a local Hugging Face checkpoint dir, batched
jitted generation, sharded over the mesh) and ``backends.openai_backend.OpenAIBackend`` (any
OpenAI-compatible endpoint through the ``openai`` client). Build one from config with
``backends.build(role_config, role=...)``.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Literal, Protocol, Sequence, Union, runtime_checkable

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
Prompt = Union[str, Sequence[Message]]
FinishReason = Literal["stop", "length"]


@dataclasses.dataclass(frozen=True)
class Completion:
    """One answer: ``text``; ``token_ids`` when the backend knows them (None for most HTTP servers);
    ``finish_reason``: ``"stop"`` (EOS or a stop string) or ``"length"`` (cut by ``max_new_tokens``);
    ``completion_tokens``: the answer's length in the serving model's tokens (an HTTP endpoint's
    ``usage.completion_tokens``; ``len(token_ids)`` when left unset and the ids are known; None when
    neither is known)."""

    text: str
    token_ids: tuple[int, ...] | None = None
    finish_reason: FinishReason = "stop"
    completion_tokens: int | None = None

    def __post_init__(self):
        if self.completion_tokens is None and self.token_ids is not None:
            object.__setattr__(self, "completion_tokens", len(self.token_ids))


class QueryCounter:
    """Thread-safe count of LLM calls by role (one prompt = one query)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, role: str, n: int = 1) -> None:
        with self._lock:
            self._counts[role] = self._counts.get(role, 0) + int(n)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


@runtime_checkable
class Backend(Protocol):
    """What the env, the generate stage and the eval stage call.

    ``role``: the role whose queries this instance counts; ``model``: the model name (for caches and
    provenance); ``counter``: the shared :class:`QueryCounter`.
    """

    role: str
    model: str
    counter: QueryCounter

    def complete(self, prompts: Sequence[Prompt], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, stop: Sequence[str] | None = None, seed: int | None = None
                 ) -> list[Completion]:
        """One completion per prompt, in order; counts ``len(prompts)`` queries of ``self.role``."""
        ...

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        """Sum of log-probs of each ``continuation`` given its ``prompt`` (one query each).

        Backends that cannot score raise :class:`teams_rl_jax.errors.BackendError`.
        """
        ...
