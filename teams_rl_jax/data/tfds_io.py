"""Instruction datasets as TensorFlow Datasets (the ``tfds`` extra), so a TPU pod can stream them from a bucket.

:func:`write_tfds` stores examples with ``tfds.dataset_builders.store_as_tfds_dataset`` under
``data_dir/name/version`` (TFRecord files + ``dataset_info.json``; ``data_dir`` may be ``gs://...``).
:func:`read_tfds` opens such a directory with ``tfds.builder_from_directory`` (no builder class needed)
and returns :class:`~teams_rl_jax.data.example.Example` records, in the written order.

Features: ``instruction``, ``input``, ``output``, ``system`` (Text) and ``history``, ``meta`` (Text
holding JSON, since chat history and generation metadata have no fixed shape). ``system`` is ``""``
for "none"; a record with the empty system prompt cannot be told apart, which no template uses.

``tensorflow_datasets`` is imported lazily: the rest of the package never needs TensorFlow, and a
missing extra gives a one-line :class:`~teams_rl_jax.errors.ConfigError` saying what to install.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Iterable

from teams_rl_jax.data.example import Example
from teams_rl_jax.errors import ConfigError, DataError

_TEXT_FIELDS = ("instruction", "input", "output", "system", "history", "meta")
_INSTALL_HINT = "pip install 'teams-rl-jax[tfds]' (tensorflow-datasets and tensorflow-cpu)"


def import_tfds():
    """``tensorflow_datasets`` (with TensorFlow present), or ConfigError naming the extra to install."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ConfigError(f"TFDS datasets need the tfds extra ({e.name or e} is missing): {_INSTALL_HINT}") from None
    # tfds imports without TensorFlow, but writing and as_dataset need it; fail here, in one line
    if importlib.util.find_spec("tensorflow") is None:
        raise ConfigError(f"TFDS datasets need the tfds extra (tensorflow is missing): {_INSTALL_HINT}")
    return tfds


def tfds_available() -> bool:
    """Whether the tfds extra (tensorflow-datasets + tensorflow) is installed (TensorFlow is not imported)."""
    try:
        import_tfds()
    except ConfigError:
        return False
    return True


def _features(tfds):
    return tfds.features.FeaturesDict({k: tfds.features.Text() for k in _TEXT_FIELDS})


def _to_tfds_example(ex: Example) -> dict[str, str]:
    return {"instruction": ex.instruction, "input": ex.input, "output": ex.output, "system": ex.system or "",
            "history": json.dumps([list(t) for t in ex.history], ensure_ascii=False),
            "meta": json.dumps(ex.meta, ensure_ascii=False) if ex.meta is not None else ""}


def _from_tfds_example(rec: dict, where: str) -> Example:
    def text(key: str) -> str:
        v = rec.get(key, b"")
        return v.decode("utf-8") if isinstance(v, bytes) else str(v)

    try:
        history = tuple((str(u), str(a)) for u, a in json.loads(text("history") or "[]"))
        meta = json.loads(text("meta")) if text("meta") else None
    except (ValueError, TypeError) as e:
        raise DataError(f"{where}: bad 'history'/'meta' JSON ({e})") from None
    if not text("instruction").strip() or not text("output").strip():
        raise DataError(f"{where}: empty 'instruction' or 'output'")
    return Example(text("instruction"), text("output"), text("input"), history, meta, text("system") or None)


def write_tfds(examples: Iterable[Example], data_dir: str | Path, *, name: str = "teams_rl_sft",
               version: str = "1.0.0", split: str = "train", description: str | None = None) -> str:
    """Store ``examples`` as TFDS dataset ``name`` (one split, order kept); returns its directory
    ``data_dir/name/version`` for :func:`read_tfds`. Fails if that version already exists."""
    tfds = import_tfds()
    keyed = [(i, _to_tfds_example(ex)) for i, ex in enumerate(examples)]
    if not keyed:
        raise DataError("refusing to write an empty TFDS dataset")
    builder = tfds.dataset_builders.store_as_tfds_dataset(
        name=name, version=version, features=_features(tfds), split_datasets={split: keyed}, data_dir=str(data_dir),
        description=description or "TeaMs-RL instruction data (instruction, input, output, history, meta)",
        disable_shuffling=True)  # keep the written order; the SFT pipeline shuffles from its seed
    return str(builder.data_dir)


def _builder_dir(path: str | Path) -> str:
    """The versioned dir holding ``dataset_info.json``: ``path`` itself, or its only ``name/version`` below."""
    path = str(path)
    if path.startswith("gs://"):
        return path  # no cheap listing without TF's gfile; must name the versioned dir
    p = Path(path)
    if (p / "dataset_info.json").is_file():
        return path
    found = sorted(p.glob("*/dataset_info.json")) + sorted(p.glob("*/*/dataset_info.json"))
    if len(found) == 1:
        return str(found[0].parent)
    if not p.exists():
        raise DataError(f"TFDS dataset dir not found: {path}")
    what = "no" if not found else f"{len(found)}"
    raise DataError(f"{path}: expected one TFDS dataset (a dir with dataset_info.json), found {what}")


def read_tfds(path: str | Path, split: str = "train") -> list[Example]:
    """Read a dataset written by :func:`write_tfds` (local dir or ``gs://`` path) into Examples."""
    tfds = import_tfds()
    bdir = _builder_dir(path)
    try:
        builder = tfds.builder_from_directory(bdir)
        if split not in builder.info.splits:
            raise DataError(f"{bdir}: no split {split!r} (has: {', '.join(builder.info.splits)})")
        missing = [k for k in ("instruction", "output") if k not in builder.info.features]
        if missing:
            raise DataError(f"{bdir}: TFDS features lack {missing}")
        ds = builder.as_dataset(split=split, shuffle_files=False)
        return [_from_tfds_example(rec, f"{bdir}[{split}] record {i}") for i, rec in enumerate(tfds.as_numpy(ds))]
    except (DataError, ConfigError):
        raise
    except Exception as e:  # noqa: BLE001 - TFDS/TF raise many types; report one line naming the dir
        raise DataError(f"{bdir}: cannot read TFDS dataset ({type(e).__name__}: {str(e).splitlines()[0]})") from None
