"""Project exceptions: errors a user can cause, each with a one-line message.

The CLI catches :class:`TeamsError`, prints ``error: <message>`` and exits with status 2.
Messages name the file, line, key or tensor at fault so the user can fix the input.
"""

from __future__ import annotations


class TeamsError(Exception):
    """Base class for user-facing errors (bad config, data, checkpoint or backend)."""


class ConfigError(TeamsError):
    """A config file, key or value is wrong (unknown key, bad type, invalid value)."""


class DataError(TeamsError):
    """A dataset file or record is malformed (message names ``file:line``)."""


class CheckpointError(TeamsError):
    """A model or training checkpoint is missing, incomplete or disagrees with its config."""


class BackendError(TeamsError):
    """An LLM backend failed or answered something we cannot use."""


class TrainingError(TeamsError):
    """Training cannot continue (e.g. a non-finite loss); the last good checkpoint is kept."""
