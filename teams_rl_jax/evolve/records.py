"""Crash-safe record files of the generate stage (seeds are read by :mod:`teams_rl_jax.data.seeds`).

Two append-only JSONL files per process shard: ``generated.jsonl`` (Alpaca records with ``meta``)
and ``progress.jsonl`` (one line per *finished* seed: its eliminations, duplicates and queries).
A seed's records are written, flushed and fsynced one by one, and only then its progress line, so
after a ``kill -9`` at any instant :func:`recover` can restore the invariant "every seed's records
appear exactly once": a half-written last line is cut, and records of seeds without a progress line
(always the tail of the file) are dropped (:func:`keep_seeds`; the same for the trace shard); those
seeds are evolved again (their paid answers replay from the response cache).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from teams_rl_jax.data.seeds import Seed, read_seeds  # noqa: F401 - re-exported for the stage


def _read_lines(path: Path) -> tuple[list[dict], int]:
    """Complete JSON lines of ``path`` and the byte length they span (a torn tail is not counted)."""
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    out, good = [], 0
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break  # half-written last line (no newline yet)
        try:
            out.append(json.loads(data[pos:nl]))
        except json.JSONDecodeError:
            break  # torn write; everything after it is dropped too
        pos = good = nl + 1
    return out, good


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())


def recover(records_path: Path, progress_path: Path) -> tuple[list[dict], list[dict]]:
    """Repair both files after a crash; returns ``(records, progress)`` of the finished seeds."""
    progress, size = _read_lines(progress_path)
    if progress_path.exists() and size != progress_path.stat().st_size:
        _truncate(progress_path, size)
    done = {p["seed_id"] for p in progress}
    return keep_seeds(records_path, done, lambda r: r.get("meta", {}).get("seed_id")), progress


def keep_seeds(path: Path, done: set, seed_of: Callable[[dict], Any]) -> list[dict]:
    """Rewrite ``path`` with only the lines of finished seeds (``seed_of(line) in done``; a torn tail
    dropped) and return them: a resumed run redoes the other seeds and appends their lines again."""
    rows, size = _read_lines(path)
    keep = [r for r in rows if seed_of(r) in done]
    if len(keep) != len(rows) or (path.exists() and size != path.stat().st_size):
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return keep


class AppendLog:
    """Append JSON lines with flush + fsync per line (durable before the next line starts)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.f = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def write_partial(self, row: dict) -> None:
        """Test hook: the first half of a line, as a crash mid-write leaves it."""
        line = json.dumps(row, ensure_ascii=False)
        self.f.write(line[: len(line) // 2])
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    """Write ``rows`` to ``path`` via a temp file + rename (readers never see a partial file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON via a temp file + rename."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False))
    os.replace(tmp, path)
