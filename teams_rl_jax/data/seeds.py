"""Seed instructions: the one reader every stage uses, and the one bundled seed file.

:func:`read_seeds` reads Alpaca JSON (a list), JSONL, or Parquet (needs pyarrow) into :class:`Seed`
records; ``path=None`` reads the bundled ``seeds.jsonl`` (package data of ``teams_rl_jax.data``, our
own wording: 150 instructions in 20 domains, 18 with an ``input``), which serves the offline default
only. The policy stage's env and the generate stage read the same seeds (the pipeline's top-level
``seeds`` key), so the policy is trained on the instructions it later steers; :func:`check_seed_file`
stops a run whose configured file is missing before any stage starts.

A record is ``{"instruction", "input"?, "id"?, "domain"?}``; other keys are ignored. ``input`` stays
Alpaca's separate field (never folded into ``instruction`` here); ``domain`` lets the token-edit env's
breadth operation pick a new seed from the same domain. Every bad record is a one-line
:class:`~teams_rl_jax.errors.DataError` naming ``file:line`` (``file:row N`` for Parquet).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from teams_rl_jax.data.example import require_str
from teams_rl_jax.data.readers import first_char, iter_json_list, iter_jsonl, iter_parquet
from teams_rl_jax.errors import DataError

BUNDLED_SEEDS = "seeds.jsonl"  # package data of teams_rl_jax.data


@dataclass(frozen=True)
class Seed:
    """One seed instruction: a stable ``id``, ``instruction``, optional ``input`` and ``domain``."""

    id: str
    instruction: str
    input: str = ""
    domain: str | None = None

    @property
    def text(self) -> str:
        """The instruction with its input folded in (as WizardLM's reference evolves it; the TeaMs-RL
        reference and our stages send the instruction alone and keep the input apart)."""
        return self.instruction if not self.input else f"{self.instruction}\n{self.input}"


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, raw record)`` of a seed file, by its format (suffix ``.parquet``, else JSON list or JSONL)."""
    if path.suffix == ".parquet":
        return ((f"{path}:row {n}", rec) for n, rec in iter_parquet(path))
    it = iter_json_list(path) if first_char(path) == "[" else iter_jsonl(path)
    return ((f"{path}:{n}", rec) for n, rec in it)


def _seed(rec: Any, where: str, index: int, field: str) -> Seed:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    instruction = require_str(rec, field, where, required=True, nonempty=True)
    input_ = require_str(rec, "input", where, required=False, nonempty=False)
    sid, dom = rec.get("id"), rec.get("domain")
    return Seed(str(sid) if sid is not None else f"seed-{index:05d}", instruction.strip(), input_.strip(),
                str(dom) if dom is not None else None)


def check_seed_file(path: str | Path | None, key: str = "seeds") -> None:
    """A one-line DataError naming ``path`` (the config's ``key``) when that seed file is missing;
    ``None`` (the bundled seeds) passes."""
    if path is not None and not Path(path).is_file():
        raise DataError(f"{key}: seed file not found: {path} (this config expects an Alpaca-format file there, "
                        f"e.g. Stanford Alpaca's alpaca_data.json; download it or set {key}: PATH; "
                        f"{key}: null = the bundled seeds, for the offline default only)")


def read_seeds(path: str | Path | None = None, limit: int | None = None, *, field: str = "instruction") -> list[Seed]:
    """The first ``limit`` seeds (all when None) of ``path`` (``None``: the bundled set).

    ``field`` names the key holding the instruction (``instruction`` in Alpaca files). Missing file,
    bad JSON, a record without a non-empty string instruction, a non-string ``input``, a duplicate
    ``id`` or no seed at all is a DataError naming the file (and line).
    """
    if path is None:
        with resources.as_file(resources.files("teams_rl_jax.data").joinpath(BUNDLED_SEEDS)) as bundled:
            return read_seeds(bundled, limit, field=field)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"seed file not found: {path}")
    seeds: list[Seed] = []
    seen: set[str] = set()
    for where, rec in _records(path):
        seed = _seed(rec, where, len(seeds), field)
        if seed.id in seen:
            raise DataError(f"{where}: duplicate seed id {seed.id!r}")
        seen.add(seed.id)
        seeds.append(seed)
        if limit is not None and len(seeds) >= limit:
            break
    if not seeds:
        raise DataError(f"{path}: no seed instructions")
    return seeds
