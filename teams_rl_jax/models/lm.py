"""The ``LM`` handle: config + params + pure apply; random init, HF checkpoint load and save.

``load_pretrained`` reads a local Hugging Face model dir tensor by tensor, straight into the target
dtype and (given a mesh) sharding: each device shard is cut from the memory-mapped file, so a 7B
model never needs two full copies in host memory and each host of a pod reads only its own shards.
Without a mesh, each parameter is one aligned host buffer filled tensor by tensor with plain file
reads, then handed to the device (zero-copy on CPU): host memory peaks at the model's bytes plus
one tensor (measured in ``docs/benchmarks.md``).

``save_pretrained`` gathers one tensor (one layer of one parameter) at a time, cast on the device to
the export dtype, and writes ``transformers``-style shards; with LoRA adapters in ``params`` (key
``"lora"``) it writes the merged weights ``W + (alpha / r) A B``, again one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from teams_rl_jax import sharding as shd
from teams_rl_jax.errors import CheckpointError
from teams_rl_jax.models import nf4
from teams_rl_jax.models.config import ModelConfig, read_hf_config
from teams_rl_jax.models.hf_io import CheckpointReader, write_sharded
from teams_rl_jax.models.llama import CausalLM, default_positions, init_cache

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(dtype: Any) -> jnp.dtype:
    """``"bfloat16"`` / ``jnp.bfloat16`` / ``None`` (float32) -> a numpy dtype."""
    if dtype is None:
        return jnp.dtype(jnp.float32)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CheckpointError(f"unsupported dtype {dtype!r} (use one of {', '.join(DTYPES)})")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class LM:
    """A causal LM: ``config``, ``params`` and pure functions of ``params``.

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype of ``params``; ``remat``
    ("none" | "full" | "dots") trades compute for activation memory in training.

    LoRA: with ``lora`` set (rank, alpha, dropout, targets), a params tree that carries adapters under the
    key ``"lora"`` (``{**base, "lora": adapters}``, see ``sft.lora``) runs the adapted model in
    :meth:`forward` / :meth:`apply`; ``lora_rng`` (a key, set inside a traced train step) turns on the
    adapters' dropout. :attr:`module` is always the plain model (generation applies merged weights).
    """

    config: ModelConfig
    params: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    lora: Any = None
    lora_rng: Any = None

    @property
    def module(self) -> CausalLM:
        """The Linen module (stateless; params live in ``self.params``)."""
        return CausalLM(self.config, dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat)

    def _variables(self, params):
        """``(module, variables, rngs)`` for plain params or ``{**base, "lora": adapters}``."""
        if not (isinstance(params, Mapping) and "lora" in params):
            return self.module, {"params": params}, None
        if self.lora is None:
            raise CheckpointError("params carry LoRA adapters ('lora') but the LM has no lora spec (lm.replace(lora=...))")
        spec = self.lora if self.lora_rng is not None else dataclasses.replace(self.lora, dropout=0.0)
        module = CausalLM(self.config, dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat, lora=spec)
        base = {k: v for k, v in params.items() if k != "lora"}
        rngs = {"dropout": self.lora_rng} if spec.dropout > 0 else None
        return module, {"params": base, "lora": params["lora"]}, rngs

    def replace(self, **changes) -> "LM":
        """A copy with fields replaced (e.g. ``lm.replace(params=new, dtype=jnp.bfloat16)``)."""
        return dataclasses.replace(self, **changes)

    def apply(self, params, input_ids, attention_mask=None, positions=None) -> jax.Array:
        """Logits ``float32 [B, T, V]``.

        ``attention_mask [B, T]``: 0 = padding, k > 0 = segment id (a 0/1 mask is one segment).
        ``positions`` default to positions restarting in each segment, skipping padding.
        """
        logits, _, _ = self.forward(params, input_ids, attention_mask, positions)
        return logits

    def forward(self, params, input_ids, segment_ids=None, positions=None, cache=None, cache_index=None):
        """``(logits f32 [B,T,V], final hidden [B,T,D], new_cache)``; the cache path is for decoding."""
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if segment_ids is None:
            segment_ids = jnp.ones_like(input_ids)
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        if positions is None:
            positions = default_positions(segment_ids)
        module, variables, rngs = self._variables(params)
        return module.apply(variables, input_ids, segment_ids, jnp.asarray(positions, jnp.int32), cache,
                            cache_index, rngs=rngs)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
        """An empty KV cache for ``batch`` rows of ``max_len`` slots (compute dtype by default)."""
        return init_cache(self.config, batch, max_len, dtype or self.dtype)

    @functools.cached_property
    def logical_axes(self):
        """Pytree like ``params`` of logical-axis tuples, e.g. ``("layers", "embed", "heads")``."""
        return logical_axes(self.config)

    def num_params(self) -> int:
        """Number of parameters."""
        return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self.params))


def _dummy_inputs():
    ids = jnp.zeros((1, 1), jnp.int32)
    return ids, jnp.ones_like(ids), jnp.zeros_like(ids)


def _abstract_params(config: ModelConfig, param_dtype=jnp.float32):
    module = CausalLM(config, param_dtype=param_dtype)
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *_dummy_inputs()))["params"]
    return boxed


def abstract_params(config: ModelConfig, dtype: Any = "float32", *, mesh=None, rules=None):
    """``jax.ShapeDtypeStruct`` pytree of the params (with their shardings given ``mesh``): what an Orbax
    restore needs, with no weights read or initialised."""
    param_dtype = as_dtype(dtype)
    shapes = nn.meta.unbox(_abstract_params(config, param_dtype))
    if mesh is None:
        return shapes
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                                  _shardings(config, mesh, rules, param_dtype))


@functools.lru_cache(maxsize=32)
def logical_axes(config: ModelConfig):
    """Logical axis names for every parameter of a model with ``config``."""
    specs = nn.get_partition_spec(_abstract_params(config))
    return jax.tree_util.tree_map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def _resolve_config(config: ModelConfig | Mapping) -> ModelConfig:
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, Mapping):
        return ModelConfig.from_dict(dict(config))
    raise CheckpointError(f"model config must be a ModelConfig or dict, got {type(config).__name__}")


def _shardings(config: ModelConfig, mesh, rules, param_dtype):
    shapes = nn.meta.unbox(_abstract_params(config, param_dtype))
    return shd.logical_to_sharding(logical_axes(config), mesh, rules, shapes=shapes)


def init(config: ModelConfig | Mapping, rng: jax.Array, dtype: Any = "float32", *, compute_dtype: Any = None,
         mesh=None, rules=None) -> LM:
    """Random-initialised LM (normal(``initializer_range``) weights, unit norms) from a config.

    ``config`` is a :class:`ModelConfig` or a Hugging Face ``config.json``-style dict. With ``mesh``,
    params are created directly in their shardings (``sharding.DEFAULT_RULES`` unless ``rules``).
    """
    config = _resolve_config(config)
    param_dtype = as_dtype(dtype)
    module = CausalLM(config, param_dtype=param_dtype)
    init_fn = lambda key: nn.meta.unbox(module.init(key, *_dummy_inputs())["params"])  # noqa: E731
    out_shardings = _shardings(config, mesh, rules, param_dtype) if mesh is not None else None
    params = jax.jit(init_fn, out_shardings=out_shardings)(rng)
    return LM(config, params, dtype=as_dtype(compute_dtype or dtype), param_dtype=param_dtype)


# ---- Hugging Face names <-> our params -------------------------------------------------------------
def hf_name(path: tuple[str, ...], layer: int | None) -> tuple[str, bool]:
    """HF tensor name for a param path (and whether it is stored transposed)."""
    *mods, leaf = path
    if mods == ["lm_head"]:
        prefix = "lm_head"
    else:
        parts = ["model"] + [f"layers.{layer}" if m == "layers" else m for m in mods]
        prefix = ".".join(parts)
    suffix = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}[leaf]
    return f"{prefix}.{suffix}", leaf == "kernel"


def _flat(tree) -> dict[tuple[str, ...], Any]:
    return {tuple(k.key for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflat(flat: dict[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def load_pretrained(path: str | Path, dtype: Any = "float32", *, compute_dtype: Any = None, mesh=None,
                    rules=None) -> LM:
    """Load a local Hugging Face Llama / Mistral / Qwen2 checkpoint dir (safetensors, single or sharded).

    Tensors are read one by one from memory-mapped files and cast to ``dtype``; with ``mesh`` each
    device receives only its shard (``sharding.DEFAULT_RULES`` unless ``rules``). Errors name the
    path, a missing tensor, or a tensor whose shape disagrees with ``config.json``.
    """
    path = Path(path)
    config = read_hf_config(path)
    reader = CheckpointReader(path)
    param_dtype = as_dtype(dtype)
    shapes = _flat(nn.meta.unbox(_abstract_params(config, param_dtype)))
    shardings = _flat(_shardings(config, mesh, rules, param_dtype)) if mesh is not None else None

    # Validate every tensor before reading any data: fail fast with names and shapes.
    L = config.num_hidden_layers
    for p, abstract in shapes.items():
        layered = p[0] == "layers"
        want = tuple(abstract.shape[1:] if layered else abstract.shape)
        for layer in range(L) if layered else [None]:
            name, transposed = hf_name(p, layer)
            hf_want = want[::-1] if transposed else want
            if name not in reader:
                raise CheckpointError(f"{path}: tensor {name!r} is missing (expected shape {hf_want})")
            got = reader.shape(name)
            if tuple(got) != hf_want:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has shape {tuple(got)} but config.json implies {hf_want}")

    if mesh is None:  # lean path: one device buffer per parameter, filled tensor by tensor
        params = _unflat({p: _load_leaf_lean(reader, p, a, L, param_dtype) for p, a in shapes.items()})
        return LM(config, params, dtype=as_dtype(compute_dtype or dtype), param_dtype=param_dtype)

    def load_leaf(p, abstract, sharding):
        layered = p[0] == "layers"

        def read(index):
            if layered:
                layers = range(L)[index[0]]
                rest = index[1:]
            else:
                layers, rest = [None], index
            blocks = []
            for layer in layers:
                name, transposed = hf_name(p, layer)
                t = reader[name]
                block = t[tuple(reversed(rest))].T if transposed else t[rest]
                blocks.append(np.asarray(block).astype(param_dtype))
            return np.stack(blocks) if layered else blocks[0]

        return jax.make_array_from_callback(abstract.shape, sharding, read)

    params = _unflat({p: load_leaf(p, a, shardings[p]) for p, a in shapes.items()})
    return LM(config, params, dtype=as_dtype(compute_dtype or dtype), param_dtype=param_dtype)


def _aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """An uninitialised host array whose data is ``align``-byte aligned: the CPU client then adopts it as a
    device buffer without copying (an unaligned one is copied, doubling the peak)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    off = -raw.ctypes.data % align
    return raw[off:off + nbytes].view(dtype).reshape(shape)


def _load_leaf_lean(reader: CheckpointReader, p, abstract, L: int, param_dtype) -> jax.Array:
    """One parameter on this process's first device, built in one host buffer filled one HF tensor at a time.

    On CPU the aligned buffer becomes the device array (zero-copy), so the host peak is the model plus
    one tensor; on an accelerator the host holds at most this one leaf while it is copied over.
    (Stacking per-layer host copies, the obvious way, peaks at 2x the leaf plus a device copy.)
    """
    buf = _aligned_empty(abstract.shape, param_dtype)
    for layer in range(L) if p[0] == "layers" else [None]:
        name, transposed = hf_name(p, layer)
        dst = buf if layer is None else buf[layer]
        rows = reader.shape(name)[0]
        step = max(1, _READ_BLOCK // max(1, dst.nbytes // max(rows, 1)))
        for a in range(0, rows, step):  # row blocks: the transient is a few MB, not a whole tensor
            t = reader.read(name, a, a + step)  # plain reads: no memory-mapped pages stay resident
            if transposed:
                dst[:, a:a + step] = t.T  # cast and transpose straight into place
            else:
                dst[a:a + step] = t
    return jax.device_put(buf, jax.local_devices()[0])  # this process's first device (multi-process runs too)


_READ_BLOCK = 1 << 20  # bytes per read when streaming a tensor into its parameter buffer


def _host_array(x) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _layer(leaf, layer):
    """One layer of a stacked leaf (all of it for ``layer=None``); an NF4 ``Packed`` kernel dequantized (f32)."""
    take = (lambda x: x) if layer is None else (lambda x: jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False))
    if isinstance(leaf, nf4.Packed):
        return nf4.dequantize(take(leaf.codes), take(leaf.absmax), jnp.float32)
    return take(leaf)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _tensor(leaf, layer, dtype):
    """One layer of a stacked leaf (``layer`` traced: one compile per leaf), cast on the device."""
    return _layer(leaf, layer).astype(dtype)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _merged_tensor(leaf, a, b, scale, layer, dtype):
    """``W + scale * A B`` for one layer, in float32, cast to ``dtype`` (LoRA merge, one tensor at a time)."""
    take = lambda x: jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False)  # noqa: E731
    w = _layer(leaf, layer).astype(jnp.float32)
    return (w + scale * (take(a).astype(jnp.float32) @ take(b).astype(jnp.float32))).astype(dtype)


def hf_tensor_order(config: ModelConfig, paths) -> list[tuple[tuple[str, ...], int | None]]:
    """``(param path, layer)`` in transformers' module order: embeddings, layer 0 ... L-1, final norm, head.

    Shards then hold whole consecutive layers, as in checkpoints written by ``transformers``.
    """
    paths = list(paths)
    first = [p for p in paths if p[0] == "embed_tokens"]
    last = sorted((p for p in paths if p[0] not in ("layers", "embed_tokens")), key=lambda p: (p[0] != "norm", p))
    layered = sorted((p for p in paths if p[0] == "layers"), key=lambda p: hf_name(p, 0)[0])
    return ([(p, None) for p in first] + [(p, layer) for layer in range(config.num_hidden_layers) for p in layered]
            + [(p, None) for p in last])


def save_pretrained(lm: LM, path: str | Path, params=None, *, dtype: Any = None,
                    max_shard_size: int | str = "5GB") -> Path:
    """Write ``config.json`` + safetensors (HF layout, ``max_shard_size`` shards) that ``transformers`` loads.

    ``params`` defaults to ``lm.params``; adapters under ``params["lora"]`` are merged into their kernels
    (``W + (lm.lora.alpha / lm.lora.rank) A B``). ``dtype`` (default: the params' dtype) is the stored
    dtype; tensors are cast on the device and gathered one at a time (one layer of one parameter), so
    the host holds at most one tensor. Multi-host: every process must call it; process 0 writes.
    """
    params = lm.params if params is None else params
    adapters = None
    if isinstance(params, Mapping) and "lora" in params:
        if lm.lora is None:
            raise CheckpointError("params carry LoRA adapters ('lora') but the LM has no lora spec")
        adapters = _flat(params["lora"])
        params = {k: v for k, v in params.items() if k != "lora"}
    path = Path(path)
    flat = nf4.pack_params(_flat(params))  # a QLoRA base: its 4-bit kernels are dequantized one layer at a time
    floats = [x.dtype for x in jax.tree_util.tree_leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
    store = as_dtype(dtype) if dtype is not None else np.dtype(floats[0])
    specs, sources = [], {}
    for p, layer in hf_tensor_order(lm.config, flat):
        name, transposed = hf_name(p, layer)
        if name == "lm_head.weight" and lm.config.tie_word_embeddings:
            continue
        leaf = flat[p]
        shape = tuple(leaf.shape[1:] if layer is not None else leaf.shape)
        specs.append((name, shape[::-1] if transposed else shape, store))
        sources[name] = (p, layer, transposed)

    def fetch(name):
        p, layer, transposed = sources[name]
        lora_key = p[:-1] + ("lora_a",)
        if adapters is not None and p[-1] == "kernel" and lora_key in adapters:
            scale = lm.lora.alpha / lm.lora.rank
            x = _merged_tensor(flat[p], adapters[lora_key], adapters[p[:-1] + ("lora_b",)], scale, layer, store)
        else:
            x = _tensor(flat[p], layer, store)
        arr = _host_array(x)
        return arr.T if transposed else arr

    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
        hf = lm.config.to_hf()
        hf["torch_dtype"] = str(store)
        hf["dtype"] = str(store)
        (path / "config.json").write_text(json.dumps(hf, indent=2))
        write_sharded(path, specs, fetch, max_shard_size)
    else:  # still join the all-gathers, in the same order
        for name, _, _ in specs:
            fetch(name)
    return path
