"""Hugging Face safetensors checkpoints: lazy, sliceable reads and streaming writes.

The safetensors format is an 8-byte header length, a JSON header (dtype, shape, byte offsets per
tensor) and raw little-endian data. We memory-map the data with numpy, so reading a tensor (or a
slice of one, for a device shard) touches only those bytes, and bfloat16 works through ``ml_dtypes``
(numpy itself has no bf16). ``read`` instead copies one tensor with plain file reads: the lean
path for loading a whole model, because every page of a memory map that has been touched counts in
the process's resident memory until it is unmapped (a full-model load would peak near 2x the model).
Writing streams tensor by tensor, so exporting never holds the whole model in host memory, and
splits the tensors into shards with a ``model.safetensors.index.json`` as transformers does.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from teams_rl_jax.errors import CheckpointError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def read_config_json(model_dir: str | Path) -> tuple[dict, Path]:
    """``(dict, path)`` of ``<dir>/config.json`` (or of a config.json path); errors name the file."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json" if model_dir.is_dir() else model_dir
    if not model_dir.exists():
        raise CheckpointError(f"model path does not exist: {model_dir}")
    if not cfg_path.is_file():
        raise CheckpointError(f"no config.json in {model_dir}")
    try:
        return json.loads(cfg_path.read_text()), cfg_path
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}:{e.lineno}: invalid JSON ({e.msg})") from None


class SafetensorsFile:
    """One ``.safetensors`` file, memory-mapped; ``file[name]`` is a lazy numpy view."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self.header = header
        self._offset = 8 + n
        self._mmap = None

    def keys(self) -> list[str]:
        """Tensor names in the file."""
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` (no data read)."""
        return tuple(self.header[name]["shape"])

    def _info(self, name: str):
        info = self.header[name]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        return info, np.dtype(dtype)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` (first axis) of tensor ``name``, copied into a fresh array with
        ``readinto``: no memory map stays behind, and a caller can stream a big tensor in row blocks."""
        info, dtype = self._info(name)
        begin, end = info["data_offsets"]
        shape = list(info["shape"])
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != end - begin:
            raise CheckpointError(f"{self.path}: tensor {name!r}: {end - begin} bytes for shape {shape}")
        if shape:
            stop = shape[0] if stop is None else min(stop, shape[0])
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            begin, shape = begin + start * row, [max(stop - start, 0)] + shape[1:]
        out = np.empty(shape, dtype)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._offset + begin)
            view = memoryview(out.reshape(-1).view(np.uint8))
            got = 0
            while got < out.nbytes:  # readinto may return fewer bytes than asked
                n = f.readinto(view[got:])
                if not n:
                    raise CheckpointError(f"{self.path}: truncated while reading tensor {name!r}")
                got += n
        return out

    def __getitem__(self, name: str) -> np.ndarray:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        info = self.header[name]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        raw = self._mmap[self._offset + begin : self._offset + end]
        return raw.view(dtype).reshape(info["shape"])


class CheckpointReader:
    """All tensors of a HF model dir: ``model.safetensors`` or an index + shards."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        single = model_dir / "model.safetensors"
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: invalid safetensors index ({e})") from None
            for name, fname in weight_map.items():
                if not (model_dir / fname).is_file():
                    raise CheckpointError(f"{index}: shard {fname} (for tensor {name!r}) does not exist")
                self._where[name] = fname
        elif single.is_file():
            self._where = {name: "model.safetensors" for name in SafetensorsFile(single).keys()}
        else:
            extra = " (pytorch_model.bin is not supported: convert to safetensors)" if any(
                model_dir.glob("pytorch_model*.bin")) else ""
            raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {model_dir}{extra}")
        self.dir = model_dir

    def _file(self, name: str) -> SafetensorsFile:
        fname = self._where[name]
        if fname not in self._files:
            self._files[fname] = SafetensorsFile(self.dir / fname)
        return self._files[fname]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        """All tensor names."""
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` without reading it."""
        return self._file(name).shape(name)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._file(name)[name]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` of tensor ``name`` as a fresh in-memory array (see :meth:`SafetensorsFile.read`)."""
        return self._file(name).read(name, start, stop)


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                      fetch: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Stream tensors to ``path``: the header from ``(name, shape, dtype)``, then ``fetch(name)`` one by one.

    ``fetch`` is called once per tensor, in order, so at most one tensor is on the host at a time.
    """
    specs = list(tensors)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype in specs:
        dtype = np.dtype(dtype)
        if dtype not in _NAMES:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {dtype}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align data to 8 bytes, as the reference writer does
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in specs:
            arr = np.ascontiguousarray(fetch(name), dtype=np.dtype(dtype))
            if tuple(arr.shape) != tuple(shape):
                raise CheckpointError(f"tensor {name!r}: fetched shape {arr.shape} != declared {tuple(shape)}")
            f.write(arr.tobytes())
    tmp.replace(path)  # atomic: a crash never leaves a half-written model.safetensors


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from ``5000000`` / ``"5GB"`` (10^9, as transformers) / ``"500MiB"`` (2^20)."""
    if isinstance(size, int) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(size), flags=re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise CheckpointError(f"shard size: expected a positive size like 5GB or 500MB, got {size!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def shard_names(n: int) -> list[str]:
    """File names transformers uses for ``n`` shards (``model.safetensors`` when there is only one)."""
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_sharded(model_dir: str | Path, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                  fetch: Callable[[str], np.ndarray], max_shard_size: int | str = "5GB",
                  metadata: dict[str, str] | None = None) -> list[Path]:
    """Write tensors (in the given order) into shards of at most ``max_shard_size`` bytes (a larger
    tensor gets a shard of its own), plus ``model.safetensors.index.json`` when there is more than one,
    exactly as ``transformers``' ``save_pretrained`` lays them out. Old weight files in the dir are removed
    first, so a stale ``model.safetensors`` can never shadow the new shards. Returns the shard paths."""
    limit = parse_size(max_shard_size)
    specs = [(name, tuple(shape), np.dtype(dt)) for name, shape, dt in tensors]
    groups: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = int(np.prod(spec[1], dtype=np.int64)) * spec[2].itemsize
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    for old in [*model_dir.glob("model-*-of-*.safetensors"), model_dir / "model.safetensors",
                model_dir / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    names = shard_names(len(groups))
    weight_map, total = {}, 0
    for fname, group in zip(names, groups):
        write_safetensors(model_dir / fname, group, fetch, metadata)
        for name, shape, dt in group:
            weight_map[name] = fname
            total += int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [model_dir / n for n in names]
