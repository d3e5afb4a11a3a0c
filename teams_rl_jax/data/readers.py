"""Instruction-dataset readers and writers, validated with ``file:line`` errors.

Formats:
* ``alpaca``: a JSON list of ``{"instruction", "input"?, "output"}`` (Stanford Alpaca's file);
* ``jsonl``: one such object per line (also the generate stage's records, whose ``meta`` is kept);
* ``sharegpt``: JSONL of ``{"conversations": [{"from": "human"|"user", "value"}, {"from": "gpt"|"assistant", ...}, ...]}``;
  each human→assistant turn pair becomes one example (earlier turns are the history).
``read_dataset(path, format="auto")`` picks by extension/content. Every example is an :class:`Example`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable

from teams_rl_jax.errors import DataError

FORMATS = ("auto", "alpaca", "jsonl", "sharegpt")
_HUMAN = ("human", "user")
_ASSISTANT = ("gpt", "assistant", "chatgpt", "bard", "model")


@dataclasses.dataclass(frozen=True)
class Example:
    """One SFT example: instruction (+ optional input and chat history) and the target output."""

    instruction: str
    output: str
    input: str = ""
    history: tuple[tuple[str, str], ...] = ()
    meta: dict | None = None


def _check_fields(obj: Any, where: str) -> Example:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("instruction", "output"):
        if key not in obj:
            raise DataError(f"{where}: missing field '{key}'")
    for key in ("instruction", "input", "output"):
        if key in obj and obj[key] is not None and not isinstance(obj[key], str):
            raise DataError(f"{where}: field '{key}' must be a string, got {type(obj[key]).__name__}")
    if not obj["instruction"].strip():
        raise DataError(f"{where}: field 'instruction' is empty")
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise DataError(f"{where}: field 'meta' must be an object")
    return Example(obj["instruction"], obj["output"], obj.get("input") or "", (), meta)


def _iter_jsonl(path: Path) -> Iterable[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


def read_alpaca_json(path: str | Path) -> list[Example]:
    """A JSON list of Alpaca records."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return [_check_fields(obj, f"{path}: record {i}") for i, obj in enumerate(data)]


def read_jsonl(path: str | Path) -> list[Example]:
    """JSONL of Alpaca-style records (``meta`` kept)."""
    path = Path(path)
    return [_check_fields(obj, f"{path}:{lineno}") for lineno, obj in _iter_jsonl(path)]


def read_sharegpt(path: str | Path) -> list[Example]:
    """ShareGPT-style JSONL; one example per assistant turn, earlier turns as history."""
    path = Path(path)
    out = []
    for lineno, obj in _iter_jsonl(path):
        where = f"{path}:{lineno}"
        conv = obj.get("conversations") if isinstance(obj, dict) else None
        if not isinstance(conv, list) or not conv:
            raise DataError(f"{where}: missing or empty 'conversations' list")
        history: list[tuple[str, str]] = []
        pending = None
        for t, turn in enumerate(conv):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise DataError(f"{where}: turn {t} needs a string 'value'")
            role = str(turn.get("from", turn.get("role", ""))).lower()
            if role == "system":
                continue
            if role in _HUMAN:
                if pending is not None:
                    raise DataError(f"{where}: turn {t}: two user turns in a row")
                pending = turn["value"]
            elif role in _ASSISTANT:
                if pending is None:
                    raise DataError(f"{where}: turn {t}: assistant turn without a user turn before it")
                out.append(Example(pending, turn["value"], "", tuple(history), obj.get("meta")))
                history.append((pending, turn["value"]))
                pending = None
            else:
                raise DataError(f"{where}: turn {t}: unknown role {role!r}")
        if not history:
            raise DataError(f"{where}: no user/assistant turn pair")
    return out


def detect_format(path: Path) -> str:
    """Guess ``alpaca`` / ``jsonl`` / ``sharegpt`` from the first non-blank character and line."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                if line.lstrip().startswith("["):
                    return "alpaca"
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return "jsonl"  # the reader reports the bad line
                return "sharegpt" if isinstance(first, dict) and "conversations" in first else "jsonl"
    return "jsonl"


def read_dataset(path: str | Path, format: str = "auto") -> list[Example]:
    """Read and validate a dataset file; raises DataError on a bad record or an empty dataset."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    if format not in FORMATS:
        raise DataError(f"unknown dataset format {format!r} (valid: {', '.join(FORMATS)})")
    if format == "auto":
        format = detect_format(path)
    reader = {"alpaca": read_alpaca_json, "jsonl": read_jsonl, "sharegpt": read_sharegpt}[format]
    examples = reader(path)
    if not examples:
        raise DataError(f"{path}: dataset is empty")
    return examples


def write_jsonl(path: str | Path, records: Iterable[dict], append: bool = False) -> None:
    """Write records as JSONL; each line flushed and fsynced so a crash loses no finished record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def example_to_record(ex: Example) -> dict:
    """The generated-record dict for an example (``meta`` only when present)."""
    rec = {"instruction": ex.instruction, "input": ex.input, "output": ex.output}
    if ex.meta is not None:
        rec["meta"] = ex.meta
    return rec
