"""Instruction-dataset readers and writers, validated with ``file:line`` errors.

Formats (``read_dataset(path, format)``):

* ``alpaca``: a JSON list of ``{"instruction", "input"?, "output"}`` (Stanford Alpaca's file);
* ``alpaca_jsonl`` (alias ``jsonl``): one such object per line; this is also the generate stage's
  record ``{"instruction", "input", "output", "meta": {...}}``, whose ``meta`` is kept;
* ``sharegpt``: ``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}, ...]}`` per
  line (or a JSON list of them); ``messages`` with ``role``/``content`` is accepted too. One
  conversation is one :class:`Example`: the last user turn and reply are ``instruction``/``output``,
  earlier exchanges are ``history``, a ``system`` turn is kept; a trailing unanswered user turn is
  dropped. Roles must alternate user/assistant.
* ``tfds``: a dataset written by :func:`teams_rl_jax.data.tfds_io.write_tfds` (needs the tfds extra).

``auto`` picks ``tfds`` for a directory or ``gs://`` path, ``alpaca``/``sharegpt`` for a JSON list,
else ``alpaca_jsonl``/``sharegpt`` from the first record. Every error is a :class:`DataError` naming
``file:line`` and what is wrong; an empty dataset is an error too.

Validation: ``instruction`` and ``output`` are non-empty strings, ``input`` a string or null, ``meta``
an object; other keys are ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from teams_rl_jax.data.example import Example, require_str
from teams_rl_jax.data.tfds_io import read_tfds
from teams_rl_jax.errors import DataError

FORMATS = ("auto", "alpaca", "alpaca_jsonl", "jsonl", "sharegpt", "tfds")
_HUMAN = ("human", "user")
_ASSISTANT = ("gpt", "assistant", "chatgpt", "bard", "model")


def _alpaca_example(obj: Any, where: str) -> Example:
    """Validate one Alpaca-style record."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    instruction = require_str(obj, "instruction", where, required=True, nonempty=True)
    output = require_str(obj, "output", where, required=True, nonempty=True)
    input_ = require_str(obj, "input", where, required=False, nonempty=False)
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise DataError(f"{where}: field 'meta' must be an object, got {type(meta).__name__}")
    return Example(instruction, output, input_, (), meta)


def _sharegpt_example(obj: Any, where: str) -> Example:
    """Validate one ShareGPT conversation into an Example (see module docstring)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    key = "conversations" if "conversations" in obj else "messages"
    conv = obj.get(key)
    if not isinstance(conv, list) or not conv:
        raise DataError(f"{where}: missing or empty 'conversations' list")
    system = None
    pairs: list[tuple[str, str]] = []
    pending = None
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: turn {t} must be an object, got {type(turn).__name__}")
        text = turn.get("value", turn.get("content"))
        if not isinstance(text, str):
            raise DataError(f"{where}: turn {t} needs a string 'value'")
        role = str(turn.get("from", turn.get("role", ""))).lower()
        if role == "system":
            if t != 0:
                raise DataError(f"{where}: turn {t}: a system turn must come first")
            system = text
        elif role in _HUMAN:
            if pending is not None:
                raise DataError(f"{where}: turn {t}: two user turns in a row")
            pending = text
        elif role in _ASSISTANT:
            if pending is None:
                raise DataError(f"{where}: turn {t}: assistant turn without a user turn before it")
            if not text.strip():
                raise DataError(f"{where}: turn {t}: empty assistant reply")
            pairs.append((pending, text))
            pending = None
        else:
            raise DataError(f"{where}: turn {t}: unknown role {role!r} (expected human/user, gpt/assistant, system)")
    if not pairs:
        raise DataError(f"{where}: no user/assistant turn pair")
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise DataError(f"{where}: field 'meta' must be an object, got {type(meta).__name__}")
    (instruction, output), history = pairs[-1], tuple(pairs[:-1])
    return Example(instruction, output, "", history, meta, system)


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed object)`` for each non-blank line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


def iter_json_list(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line where the element starts, element)`` for each element of a top-level JSON list.

    Parses element by element (``raw_decode``) so a bad record is reported at its own line.
    """
    text = path.read_text(encoding="utf-8")
    dec = json.JSONDecoder()
    n = len(text)
    line, counted = 1, 0  # line number of offset `counted` (newlines counted incrementally: linear time)

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    def skip_ws(pos: int) -> int:
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        return pos

    i = skip_ws(0)
    if i < n and text[i] == "\ufeff":  # byte-order mark
        i = skip_ws(i + 1)
    if i >= n or text[i] != "[":
        raise DataError(f"{path}:{line_at(i)}: expected a JSON list of records")
    i = skip_ws(i + 1)
    if i < n and text[i] == "]":
        return
    while True:
        start_line = line_at(i)
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        yield start_line, obj
        i = skip_ws(i)
        if i < n and text[i] == ",":
            i = skip_ws(i + 1)
            continue
        if i < n and text[i] == "]":
            break
        raise DataError(f"{path}:{line_at(min(i, n))}: invalid JSON (expected ',' or ']' after a record)")
    if skip_ws(i + 1) < n:
        raise DataError(f"{path}:{line_at(skip_ws(i + 1))}: invalid JSON (extra data after the list)")


def iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    """``(row number from 1, row as a dict)`` of a Parquet file (needs pyarrow: a one-line DataError without it)."""
    try:
        import pyarrow.parquet as pq  # optional: installed with datasets / the tfds extra
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types; report one line
        raise DataError(f"{path}: cannot read Parquet ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    yield from enumerate(table.to_pylist(), 1)


def first_char(path: Path) -> str:
    """The first non-blank character of a text file (``[`` for a JSON list), ``""`` when empty."""
    with open(path, encoding="utf-8") as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip(" \t\r\n\ufeff")
            if stripped:
                return stripped[0]
    return ""


def read_alpaca_json(path: str | Path) -> list[Example]:
    """A JSON list of Alpaca records; errors name the line where the bad record starts."""
    path = Path(path)
    return [_alpaca_example(obj, f"{path}:{line}") for line, obj in iter_json_list(path)]


def read_jsonl(path: str | Path) -> list[Example]:
    """JSONL of Alpaca-style records (``meta`` kept); errors name ``file:line``."""
    path = Path(path)
    return [_alpaca_example(obj, f"{path}:{line}") for line, obj in iter_jsonl(path)]


def read_sharegpt(path: str | Path) -> list[Example]:
    """ShareGPT conversations (JSONL, or one JSON list); one :class:`Example` per conversation."""
    path = Path(path)
    it = iter_json_list(path) if first_char(path) == "[" else iter_jsonl(path)
    return [_sharegpt_example(obj, f"{path}:{line}") for line, obj in it]


def _is_tfds_path(path: str | Path) -> bool:
    return str(path).startswith("gs://") or Path(path).is_dir()


def detect_format(path: str | Path) -> str:
    """Guess the format: ``tfds`` (directory or ``gs://``), else from the first record of the file."""
    if _is_tfds_path(path):
        return "tfds"
    path = Path(path)
    if first_char(path) == "[":
        for _, first in iter_json_list(path):
            return "sharegpt" if isinstance(first, dict) and ("conversations" in first or "messages" in first) \
                else "alpaca"
        return "alpaca"
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return "alpaca_jsonl"  # the reader reports the bad line
                is_chat = isinstance(first, dict) and ("conversations" in first or "messages" in first)
                return "sharegpt" if is_chat else "alpaca_jsonl"
    return "alpaca_jsonl"


def read_dataset(path: str | Path, format: str = "auto", *, split: str = "train") -> list[Example]:
    """Read and validate a dataset; DataError naming ``file:line`` on a bad record, or on an empty dataset.

    ``split`` only applies to ``tfds`` datasets.
    """
    if format not in FORMATS:
        raise DataError(f"unknown dataset format {format!r} (valid: {', '.join(FORMATS)})")
    if format == "tfds" or (format == "auto" and _is_tfds_path(path)):
        examples = read_tfds(path, split=split)
    else:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"dataset file not found: {path}")
        if format == "auto":
            format = detect_format(path)
        reader = {"alpaca": read_alpaca_json, "alpaca_jsonl": read_jsonl, "jsonl": read_jsonl,
                  "sharegpt": read_sharegpt}[format]
        examples = reader(path)
    if not examples:
        raise DataError(f"{path}: dataset is empty (no records)")
    return examples


def _is_chat(ex: Example) -> bool:
    return bool(ex.history) or ex.system is not None


def example_to_record(ex: Example, chat: bool | None = None) -> dict:
    """The JSON record for an example: Alpaca-style (``meta`` only when present), or a ShareGPT
    ``conversations`` record (``chat=True``; by default when it has chat history or a system prompt,
    which Alpaca records cannot hold; an ``input`` then follows the instruction after a blank line)."""
    if chat or (chat is None and _is_chat(ex)):
        conv = [{"from": "system", "value": ex.system}] if ex.system is not None else []
        for user, assistant in ex.history:
            conv += [{"from": "human", "value": user}, {"from": "gpt", "value": assistant}]
        user = f"{ex.instruction}\n\n{ex.input}" if ex.input else ex.instruction
        conv += [{"from": "human", "value": user}, {"from": "gpt", "value": ex.output}]
        rec: dict = {"conversations": conv}
    else:
        rec = {"instruction": ex.instruction, "input": ex.input, "output": ex.output}
    if ex.meta is not None:
        rec["meta"] = ex.meta
    return rec


def write_jsonl(path: str | Path, records: Iterable[dict | Example], append: bool = False) -> int:
    """Write records (dicts or :class:`Example`) as JSONL and fsync, so a crash loses no finished file
    content; returns the number of records written.

    Examples become Alpaca records, or all become ShareGPT conversation records if any of them is a
    chat (history or system prompt), so the file stays in one format that :func:`read_dataset` reads.
    """
    path = Path(path)
    records = list(records)
    chat = any(isinstance(r, Example) and _is_chat(r) for r in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for rec in records:
            if isinstance(rec, Example):
                rec = example_to_record(rec, chat)
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    return n
