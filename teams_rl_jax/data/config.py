"""``DataConfig``: the SFT dataset, its format, prompt template and sequence layout.

Loaded like every config with :mod:`teams_rl_jax.config` (``from_dict`` checks keys and types and
calls :meth:`DataConfig.validate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from teams_rl_jax.data.readers import FORMATS
from teams_rl_jax.data.templates import TEMPLATES
from teams_rl_jax.errors import ConfigError


@dataclass(frozen=True)
class DataConfig:
    """Dataset file, format, prompt template, truncation, packing and order."""

    # "auto": the generate stage's run_dir/data/generated.jsonl (resolved by the SFT stage)
    path: str = "auto"
    # "auto" detects from the file; "jsonl" is an alias of "alpaca_jsonl"; "tfds": a dataset dir or gs:// path
    format: Literal["auto", "alpaca", "alpaca_jsonl", "jsonl", "sharegpt", "tfds"] = "auto"
    # "chat": the tokenizer's own chat template (apply_chat_template), loss on assistant turns only
    template: Literal["alpaca", "vicuna", "chat"] = "alpaca"
    # template "chat" when the tokenizer has none: a builtin ("chatml") or a Jinja file path
    chat_template: str | None = None
    max_seq_len: int = 512
    # an example whose prompt leaves fewer response tokens than this in max_seq_len is dropped
    min_response_tokens: int = 1
    pack: bool = True
    pack_window: int = 64  # first-fit looks at this many most recent rows
    shuffle: bool = True
    shuffle_seed: int = 0
    # drop the short last global batch of an epoch (true) or fill it with padding rows (false)
    drop_remainder: bool = True
    tfds_split: str = "train"

    def validate(self) -> None:
        """Check values (from_dict already checked types and Literal choices)."""
        if self.format not in FORMATS:
            raise ConfigError(f"format: expected one of {list(FORMATS)}, got {self.format!r}")
        if self.template not in TEMPLATES:
            raise ConfigError(f"template: expected one of {list(TEMPLATES)}, got {self.template!r}")
        if self.chat_template is not None and self.template != "chat":
            raise ConfigError(f"chat_template is only used with template 'chat', got template {self.template!r}")
        if self.max_seq_len < 8:
            raise ConfigError(f"max_seq_len must be >= 8, got {self.max_seq_len}")
        if not 1 <= self.min_response_tokens < self.max_seq_len:
            raise ConfigError(f"min_response_tokens must be in [1, max_seq_len), got {self.min_response_tokens}")
        if self.pack_window < 1:
            raise ConfigError(f"pack_window must be >= 1, got {self.pack_window}")
        if not self.path:
            raise ConfigError("path must not be empty (use 'auto' for the generate stage's output)")
        if self.format == "tfds" and self.path == "auto":
            raise ConfigError("format 'tfds' needs an explicit path (a TFDS dataset dir or gs:// path)")
