"""The ``LM`` handle: config + params + pure apply; random init, HF checkpoint load and save.

``load_pretrained`` reads a local Hugging Face model dir tensor by tensor, straight into the target
dtype and (given a mesh) sharding: each device shard is cut from the memory-mapped file, so a 7B
model never needs two full copies in host memory and each host of a pod reads only its own shards.
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

from teams_rl_jax.errors import CheckpointError
from teams_rl_jax.models.config import ModelConfig, read_hf_config
from teams_rl_jax.models.hf_io import CheckpointReader, write_safetensors
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
    """

    config: ModelConfig
    params: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"

    @property
    def module(self) -> CausalLM:
        """The Linen module (stateless; params live in ``self.params``)."""
        return CausalLM(self.config, dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat)

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
        return self.module.apply({"params": params}, input_ids, segment_ids, jnp.asarray(positions, jnp.int32),
                                 cache, cache_index)

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
    from teams_rl_jax import sharding as shd

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
    if mesh is not None:
        shardings = _flat(_shardings(config, mesh, rules, param_dtype))
    else:
        device = jax.devices()[0]
        shardings = {k: jax.sharding.SingleDeviceSharding(device) for k in shapes}

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


def _host_array(x) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_pretrained(lm: LM, path: str | Path, params=None, *, dtype: Any = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (HF layout) that ``transformers`` loads.

    ``params`` defaults to ``lm.params``; ``dtype`` (default: the params' dtype) is the stored dtype.
    Streams one tensor at a time. Multi-host: every process must call it; process 0 writes.
    """
    params = lm.params if params is None else params
    path = Path(path)
    flat = _flat(params)
    store = as_dtype(dtype) if dtype is not None else None
    L = lm.config.num_hidden_layers
    specs, sources = [], {}
    for p, leaf in flat.items():
        layered = p[0] == "layers"
        for layer in range(L) if layered else [None]:
            name, transposed = hf_name(p, layer)
            shape = tuple(leaf.shape[1:] if layered else leaf.shape)
            shape = shape[::-1] if transposed else shape
            out_dtype = store or np.dtype(leaf.dtype)
            specs.append((name, shape, out_dtype))
            sources[name] = (p, layer, transposed)
    if lm.config.tie_word_embeddings:
        specs = [s for s in specs if s[0] != "lm_head.weight"]
    specs.sort(key=lambda s: s[0])

    cache: dict = {}

    def fetch(name):
        p, layer, transposed = sources[name]
        if p not in cache:  # one leaf (all layers of it) on the host at a time
            cache.clear()
            cache[p] = _host_array(flat[p])
        arr = cache[p] if layer is None else cache[p][layer]
        return arr.T if transposed else arr

    # Group by leaf so `fetch` pulls each stacked leaf once.
    specs.sort(key=lambda s: (sources[s[0]][0], sources[s[0]][1] if sources[s[0]][1] is not None else -1))
    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
        hf = lm.config.to_hf()
        hf["torch_dtype"] = str(np.dtype(store or np.dtype(jax.tree_util.tree_leaves(params)[0].dtype)))
        (path / "config.json").write_text(json.dumps(hf, indent=2))
        write_safetensors(path / "model.safetensors", specs, fetch)
    else:  # still join the all-gathers
        for name, _, _ in specs:
            fetch(name)
    return path
