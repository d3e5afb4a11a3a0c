"""Hugging Face safetensors checkpoints: lazy, sliceable reads and streaming writes.

The safetensors format is an 8-byte header length, a JSON header (dtype, shape, byte offsets per
tensor) and raw little-endian data. We memory-map the data with numpy, so reading a tensor (or a
slice of one, for a device shard) touches only those bytes, and bfloat16 works through ``ml_dtypes``
(numpy itself has no bf16). Writing streams tensor by tensor, so exporting never holds the whole
model in host memory.
"""

from __future__ import annotations

import json
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
