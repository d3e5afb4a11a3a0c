"""Device mesh over ``("data", "fsdp", "tensor")`` and logical-axis sharding rules.

Parameters and activations are annotated with *logical* axis names in the model (``embed``,
``heads``, ``mlp``, ``vocab``, ``activation_batch`` ...); the rules below map them to mesh axes,
MaxText style. Changing the parallelism layout means changing rules or mesh shape, not the model.

* ``data``: pure data parallelism (params replicated across it).
* ``fsdp``: data parallelism with parameters and optimizer state sharded along ``embed`` (ZeRO-3).
* ``tensor``: Megatron-style tensor parallelism over heads / MLP / vocab.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from teams_rl_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    # activations
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` with axes ``("data", "fsdp", "tensor")``; one size may be -1 (= all remaining devices)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ConfigError("mesh: at most one of data/fsdp/tensor may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh: sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}")
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"mesh: {len(devices)} devices not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ConfigError(f"mesh: data*fsdp*tensor = {int(np.prod(sizes))} but there are {len(devices)} devices")
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(sizes, devices=devices)  # topology-aware on TPU/GPU
    except Exception:  # noqa: BLE001 - fall back to plain order (e.g. simulated CPU devices)
        arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, MESH_AXES)


def _mesh_axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


class ShardingWarning(UserWarning):
    """A parameter dimension its mesh axes cannot divide is replicated along them instead."""


def logical_to_spec(logical: Sequence[str | None], rules=DEFAULT_RULES, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> P:
    """Map logical axis names to a ``PartitionSpec``.

    A mesh axis is used at most once per array; with ``shape`` and ``mesh``, a dimension not
    divisible by its mesh axes stays replicated (e.g. 2 KV heads on a tensor axis of 4).
    """
    return _spec(logical, rules, mesh, shape)[0]


def _spec(logical, rules, mesh, shape) -> tuple[P, list[tuple[int, tuple[str, ...]]]]:
    """The spec, and ``(dim, mesh axes)`` of each dimension left replicated because it is not divisible."""
    table = dict(rules)
    used: set[str] = set()
    out, dropped = [], []
    for i, name in enumerate(logical):
        axes = table.get(name) if name is not None else None
        if axes is not None:
            tup = (axes,) if isinstance(axes, str) else tuple(axes)
            tup = tuple(a for a in tup if a not in used and (mesh is None or a in mesh.shape))
            if mesh is not None:
                tup = tuple(a for a in tup if mesh.shape[a] > 1)
            if shape is not None and mesh is not None and tup and shape[i] % _mesh_axis_size(mesh, tup):
                dropped.append((i, tup))
                tup = ()
            used.update(tup)
            axes = None if not tup else (tup[0] if len(tup) == 1 else tup)
        out.append(axes)
    return P(*out), dropped


def _warn_replicated(name: str, logical, shape, dtype, mesh: Mesh, spec: P, dropped) -> None:
    """Warn, naming the tensor, that a dimension is replicated, and what that costs per device."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    per_device = nbytes / int(np.prod([_mesh_axis_size(mesh, a) for a in spec if a is not None] or [1]))
    for dim, axes in dropped:
        n = _mesh_axis_size(mesh, axes)
        extra = per_device * (1 - 1 / n)
        pad = -(-shape[dim] // n) * n
        warnings.warn(
            f"sharding: {name} dim {dim} ({logical[dim]}, size {shape[dim]}) is not divisible by mesh axis "
            f"{'x'.join(axes)} ({n}): replicated along it, +{extra / 2**20:.1f} MiB per device "
            f"({per_device / 2**20:.1f} MiB instead of {(per_device - extra) / 2**20:.1f} MiB); pad it to {pad} "
            f"to shard it", ShardingWarning, stacklevel=3)


def logical_to_sharding(logical_tree, mesh: Mesh, rules=None, shapes=None):
    """Pytree of logical-axis tuples (and optional matching shapes) -> pytree of ``NamedSharding``."""
    rules = DEFAULT_RULES if rules is None else rules
    is_leaf = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)  # noqa: E731
    if shapes is None:
        return jax.tree_util.tree_map(lambda l: NamedSharding(mesh, logical_to_spec(l, rules, mesh)), logical_tree,
                                      is_leaf=is_leaf)

    def one(path, logical, leaf):
        spec, dropped = _spec(logical, rules, mesh, leaf.shape)
        if dropped:
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            _warn_replicated(name, logical, leaf.shape, getattr(leaf, "dtype", np.float32), mesh, spec, dropped)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, logical_tree, shapes, is_leaf=is_leaf)


def param_shardings(lm, mesh: Mesh, rules=None):
    """``NamedSharding`` for every parameter of ``lm`` (an ``models.LM``)."""
    return logical_to_sharding(lm.logical_axes, mesh, rules, shapes=lm.params)


def shard_params(lm, mesh: Mesh, rules=None):
    """``lm`` with its params moved to their shardings on ``mesh``."""
    return lm.replace(params=jax.device_put(lm.params, param_shardings(lm, mesh, rules)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding for a ``[B, T, ...]`` batch: batch over ``("data", "fsdp")``, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, P())


@contextlib.contextmanager
def activation_rules(mesh: Mesh | None, rules=None):
    """Context under which the model's ``with_logical_constraint`` annotations take effect.

    Use around tracing (calling a jitted function the first time) with a mesh; a no-op for ``None``.
    """
    if mesh is None:
        yield
        return
    rules = DEFAULT_RULES if rules is None else rules
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
