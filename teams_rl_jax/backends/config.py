"""Per-role LLM backend config: ``roles.<instructor|reviewer|expert>`` in YAML.

Each role names a backend (``flax``: a local Hugging Face checkpoint dir run in-process;
``openai``: any OpenAI-compatible HTTP endpoint; ``openai_batch``: the same endpoint's Batch API, for
the generate stage's roles only) plus what that backend needs. The API key is never
part of the config: ``api_key_env`` names the environment variable that holds it, so a written,
resolved config can never leak it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from teams_rl_jax.errors import ConfigError

BACKENDS = ("flax", "openai", "openai_batch")
DTYPES = ("float32", "bfloat16", "float16")
REVIEWER_PARSERS = ("exact", "lenient")
# A role's reply length when ``roles.<role>.max_new_tokens`` is unset: a rewritten instruction, the
# reviewer's "Equal"/"Not Equal" (8 tokens leave room for a short sentence), an expert answer.
DEFAULT_MAX_NEW_TOKENS = {"instructor": 256, "reviewer": 8, "expert": 512}


@dataclasses.dataclass(frozen=True)
class RoleConfig:
    """One LLM role (see the module docstring)."""

    backend: Literal["flax", "openai", "openai_batch"] = "flax"
    checkpoint: str | None = None      # flax: local HF dir (tokenizer from the same dir)
    dtype: str = "bfloat16"            # flax: param dtype
    mesh: dict | None = None           # flax: {data, fsdp, tensor} for sharding.make_mesh; None = one device
    max_batch: int = 32                # flax: rows per batched generate call
    base_url: str | None = None        # openai: e.g. http://127.0.0.1:8000/v1
    model: str | None = None           # openai: served model name (flax: defaults to the dir name)
    api_key_env: str | None = None     # NAME of the env variable holding the key (never the key itself)
    chat: bool = True                  # chat messages (/v1/chat/completions, chat template) vs plain text
    max_concurrency: int = 8           # openai: requests in flight
    requests_per_minute: int | None = None  # openai: budget over any sliding minute, per process (None: none)
    tokens_per_minute: int | None = None    # openai: same, prompt (4 chars a token) + max_new_tokens per request
    timeout_s: float = 60.0            # openai: per request
    max_retries: int = 5               # openai: retries after the first attempt
    backoff_s: float = 0.5             # openai: base of the exponential backoff (full jitter)
    max_backoff_s: float = 30.0        # openai: cap of one backoff sleep (and of an honoured Retry-After)
    batch_poll_s: float = 10.0         # openai_batch: seconds between two batches.retrieve polls
    batch_timeout_s: float = 86400.0   # openai_batch: give up waiting (rerunning re-attaches to the batch)
    # Longest reply, in every stage that calls this role (None = DEFAULT_MAX_NEW_TOKENS[role]).
    max_new_tokens: int | None = None
    # reviewer: how its text reply is read (roles.reviewer.parse_reply): "exact" = the reference
    # code's rule (the stripped reply is "Not Equal"), "lenient" = chat answers in sentences.
    parser: Literal["exact", "lenient"] = "lenient"

    def validate(self) -> None:
        """One-line ConfigError naming the key at fault (``config.from_dict`` calls it; so does ``build``)."""
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend: expected one of {list(BACKENDS)}, got {self.backend!r}")
        if self.backend == "flax":
            if not self.checkpoint:
                raise ConfigError("checkpoint: the flax backend needs a local Hugging Face checkpoint dir")
            if self.dtype not in DTYPES:
                raise ConfigError(f"dtype: expected one of {list(DTYPES)}, got {self.dtype!r}")
            if self.mesh is not None:
                bad = sorted(set(self.mesh) - {"data", "fsdp", "tensor"})
                if bad:
                    raise ConfigError(f"mesh: unknown axis {bad[0]!r} (valid: data, fsdp, tensor)")
        else:
            if not self.base_url:
                raise ConfigError(f"base_url: the {self.backend} backend needs an endpoint, e.g. "
                                  "http://127.0.0.1:8000/v1")
            if not self.base_url.startswith(("http://", "https://")):
                raise ConfigError(f"base_url: expected an http(s) URL, got {self.base_url!r}")
            if not self.model:
                raise ConfigError(f"model: the {self.backend} backend needs the served model name")
        if self.api_key_env is not None and (not self.api_key_env or not self.api_key_env.replace("_", "").isalnum()):
            # A value that is not a variable name is most likely the key itself pasted by mistake:
            # refuse it without echoing it.
            raise ConfigError("api_key_env: expected the NAME of an environment variable (letters, digits, _)")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.parser not in REVIEWER_PARSERS:
            raise ConfigError(f"parser: expected one of {list(REVIEWER_PARSERS)}, got {self.parser!r}")
        if self.max_batch < 1:
            raise ConfigError(f"max_batch: must be >= 1, got {self.max_batch}")
        if self.max_concurrency < 1:
            raise ConfigError(f"max_concurrency: must be >= 1, got {self.max_concurrency}")
        for key in ("requests_per_minute", "tokens_per_minute"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ConfigError(f"{key}: must be >= 1 or null (no limit), got {v}")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s: must be > 0, got {self.timeout_s}")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries: must be >= 0, got {self.max_retries}")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ConfigError("backoff_s/max_backoff_s: must be >= 0")
        if self.batch_poll_s <= 0:
            raise ConfigError(f"batch_poll_s: must be > 0, got {self.batch_poll_s}")
        if self.batch_timeout_s <= 0:
            raise ConfigError(f"batch_timeout_s: must be > 0, got {self.batch_timeout_s}")


@dataclasses.dataclass(frozen=True)
class RolesConfig:
    """The LLM roles of a run; a role left out is not used by that run."""

    instructor: RoleConfig | None = None
    reviewer: RoleConfig | None = None
    expert: RoleConfig | None = None


def role_config(roles, role: str, backend=None) -> RoleConfig | None:
    """``roles.<role>`` (a RolesConfig or mapping), else the built backend's ``config`` attribute (the
    ``backend`` given, or a built backend standing in ``roles``), else None."""
    spec = roles.get(role) if isinstance(roles, dict) else getattr(roles, role, None)
    backend = spec if backend is None and not isinstance(spec, RoleConfig) else backend
    if isinstance(spec, RoleConfig):
        return spec
    cfg = getattr(backend, "config", None)
    return cfg if isinstance(cfg, RoleConfig) else None


def public_identity(roles, role: str, backend=None) -> dict:
    """What may be published about ``role`` (dataset and model cards): its backend, model name, checkpoint
    dir and reply length. Never ``base_url`` (it may hold a token) nor anything about the API key."""
    cfg = role_config(roles, role, backend)
    if cfg is None:  # a built backend without a RoleConfig (tests' stubs): its model name only
        return {"model": getattr(backend, "model", None)}
    out = {"backend": cfg.backend, "model": cfg.model or (Path(cfg.checkpoint).name if cfg.checkpoint else None),
           "checkpoint": cfg.checkpoint if cfg.backend == "flax" else None,
           "max_new_tokens": max_new_tokens(roles, role, backend)}
    return {k: v for k, v in out.items() if v is not None}


def max_new_tokens(roles, role: str, backend=None) -> int:
    """The reply length of ``role``: ``roles.<role>.max_new_tokens``, else the role's default."""
    cfg = role_config(roles, role, backend)
    if cfg is not None and cfg.max_new_tokens is not None:
        return int(cfg.max_new_tokens)
    return DEFAULT_MAX_NEW_TOKENS[role]
