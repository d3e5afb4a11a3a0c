"""``EnvConfig``: the instruction-evolution env's settings (operator, episode, buffers, rewards, rules).

Load with ``teams_rl_jax.config.from_dict(EnvConfig, d)`` or pass it (or fields) to
``teams_rl_jax.env.make(name, config)``; the policy stage's ``policy.env_config`` section is one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from teams_rl_jax.env.elimination import ELIMINATION_RULES
from teams_rl_jax.env.embedding import EMBEDDINGS
from teams_rl_jax.env.operations import OPERATIONS, OPERATION_REGISTRY
from teams_rl_jax.env.rewards import REWARD_TERMS
from teams_rl_jax.errors import ConfigError

# Reward terms an LLM role adds when the env is built from roles (env.factory): weight them by name.
ROLE_TERMS = ("reviewer",)
# ``EnvConfig.reward``: what a step earns (docs/design.md "The paper's method (issue 18)").
REWARDS = ("shaped", "reviewer_soft", "reviewer_binary")
# ``EnvConfig.observation``: what the policy sees.
OBSERVATIONS = ("embedding", "paper")


TOKEN_EDIT_MAX_LEN = 128  # the token-edit env's buffer width when ``max_len`` is not set


@dataclass(frozen=True)
class EnvConfig:
    """Settings of ``teams_rl_jax.env.make``; names are checked against the registries."""

    # "token_edit": LLM-free edits from phrase banks (0 queries). "llm": an instructor LM operator.
    operator: Literal["token_edit", "llm"] = "token_edit"
    # Actions, in order (registered operation names).
    operations: tuple[str, ...] = OPERATIONS
    episode_length: int = 6  # the paper's six evolution steps
    # Instruction buffer width in tokens; an edit that does not fit is not applied. None: the LLM env's
    # is ``roles.instructor.max_new_tokens`` (one setting for the rewrite limit in both stages; an
    # explicit different value is an error), the token-edit env's ``TOKEN_EDIT_MAX_LEN``.
    max_len: int | None = None
    # Seeds: a JSONL file (None = the 48 packaged seeds); the text field; at most this many.
    seeds_path: str | None = None
    seed_field: str = "instruction"
    max_seeds: int | None = None
    on_long_seed: Literal["error", "skip", "truncate"] = "error"
    # Tokenizer: a local Hugging Face tokenizer dir; None = an offline word-level one built from the
    # seeds and phrase banks (``vocab_size`` words at most).
    tokenizer: str | None = None
    vocab_size: int = 8192
    # Observation / novelty embedding ("hashed": random projection of hashed unigram+bigram counts).
    embedding: str = "hashed"
    embed_dim: int = 64
    embed_buckets: int = 512
    embed_seed: int = 0
    # Reward (docs/design.md "The paper's method"):
    # * "shaped" (ours, the default): the weighted terms of ``reward_weights`` (+ ``reviewer: 1.0`` when
    #   the env is built with a reviewer role) minus the elimination penalties;
    # * "reviewer_binary" [paper]: the reviewer's greedy-decoded reply, parsed with
    #   ``roles.reviewer.parser`` (``exact`` = the reference rule: 1 iff the stripped reply is "Not
    #   Equal"); an in-process reviewer decodes too (the text reviewer on the host); one query per step;
    # * "reviewer_soft" (ours): P(Not Equal) from one forward pass of an in-process reviewer (env.judge).
    # The two reviewer rewards ignore ``reward_weights`` and need a reviewer role.
    reward: Literal["shaped", "reviewer_soft", "reviewer_binary"] = "shaped"
    # Observation: "embedding" (ours: instruction embedding, one-hot previous action, step fraction) or
    # "paper" (the reference: one-hot of the last operation in the reference's index order, zeros at reset).
    observation: Literal["embedding", "paper"] = "embedding"
    # Term name -> weight of the "shaped" reward (see env/rewards.py for the default's rationale).
    reward_weights: dict[str, float] = field(
        default_factory=lambda: {"novelty": 1.0, "length_gain": 0.5, "distinct_gain": 0.5})
    length_scale: float = 20.0  # tokens of growth worth a full length_gain (paper: +10..20 words)
    distinct_scale: float = 10.0  # new distinct tokens worth a full distinct_gain
    # Elimination rule name -> penalty (WizardLM's four rules; see env/elimination.py).
    elimination: dict[str, float] = field(
        default_factory=lambda: {"no_gain": 1.0, "sorry_short": 1.0, "stopwords_only": 1.0, "template_copy": 1.0})
    # Whether an eliminated step pays its rules' penalties (False: the rules are still checked and
    # reported in ``info["eliminated"]``, and ``revert_eliminated`` still applies; the paper: no penalty).
    elimination_penalties: bool = True
    sorry_max_words: int = 80
    # An eliminated evolution is dropped (instruction unchanged, its reward terms zeroed) ...
    revert_eliminated: bool = True
    # ... and, if set, ends the episode (``terminated``; running out of steps is ``truncated``).
    terminate_on_elimination: bool = False

    # Queries charged per role for every step taken (not ``stop``), on top of what the operator and
    # reward terms report: e.g. {instructor: 1, reviewer: 1} makes the token-edit env cost what the
    # LLM env would, so a query budget has something to trade there too.
    simulated_queries: dict[str, float] = field(default_factory=dict)
    # LLM instructor (``operator: llm`` built from ``roles``): sampling. Its rewrite length limit is
    # the role's own, ``roles.instructor.max_new_tokens``.
    temperature: float = 0.7
    top_p: float = 0.95

    def validate(self) -> None:
        """Raise :class:`ConfigError` on an invalid value or an unregistered name."""
        if self.reward not in REWARDS:
            raise ConfigError(f"reward: expected one of {list(REWARDS)}, got {self.reward!r}")
        if self.observation not in OBSERVATIONS:
            raise ConfigError(f"observation: expected one of {list(OBSERVATIONS)}, got {self.observation!r}")
        if self.episode_length < 1:
            raise ConfigError(f"episode_length must be >= 1, got {self.episode_length}")
        if self.max_len is not None and self.max_len < 8:
            raise ConfigError(f"max_len must be >= 8, got {self.max_len}")
        if not self.operations:
            raise ConfigError("operations must not be empty")
        if len(set(self.operations)) != len(self.operations):
            raise ConfigError(f"operations has duplicates: {list(self.operations)}")
        for op in self.operations:
            OPERATION_REGISTRY.get(op)
        if self.max_seeds is not None and self.max_seeds < 1:
            raise ConfigError(f"max_seeds must be >= 1, got {self.max_seeds}")
        EMBEDDINGS.get(self.embedding)
        for name in ("embed_dim", "embed_buckets", "vocab_size", "sorry_max_words"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name, w in self.reward_weights.items():
            if name not in ROLE_TERMS:  # role terms are registered when make() builds the role
                REWARD_TERMS.get(name)
            if not math.isfinite(w):
                raise ConfigError(f"reward_weights.{name} must be finite, got {w}")
        for name, p in self.elimination.items():
            ELIMINATION_RULES.get(name)
            if not (math.isfinite(p) and p >= 0):
                raise ConfigError(f"elimination.{name} must be a penalty >= 0, got {p}")
        for role, q in self.simulated_queries.items():
            if not (math.isfinite(q) and q >= 0):
                raise ConfigError(f"simulated_queries.{role} must be >= 0, got {q}")
        if not (0 < self.top_p <= 1) or self.temperature < 0:
            raise ConfigError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if "stop" in self.operations and len(self.operations) == 1:
            raise ConfigError("operations: 'stop' needs at least one other operation")
        for name in ("length_scale", "distinct_scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
