"""LoRA SFT: adapter init and shardings, and the PEFT-format adapter export/import.

The adapters are the ``"lora"`` collection of ``models.llama.LoRADense`` (``A [L, in, r]``, ``B [L, r, out]``,
float32, stacked over layers like the base). In training the trainable tree is ``{"lora": adapters}``,
the frozen base rides along in ``TrainState.frozen``, and the model sees ``{**base, "lora": adapters}``
(``LM.forward`` understands that tree). Only the adapters and their Adam moments are optimized and
checkpointed.

Why not merge ``W + AB`` on the fly before the forward: that materialises a second full copy of every
targeted weight and, in the backward pass, a full-size ``dL/dW``, which is exactly the memory LoRA exists
to avoid; computing ``x W + (x A) B`` keeps the extra cost at ``O(tokens * r * (in + out))``.

PEFT layout (what ``peft.PeftModel.from_pretrained`` reads): ``adapter_config.json`` and
``adapter_model.safetensors`` with ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``
``[r, in]`` (= our ``A[i].T``) and ``...lora_B.weight`` ``[out, r]`` (= ``B[i].T``). PEFT scales by
``lora_alpha / r`` as we do.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from teams_rl_jax import sharding as shd
from teams_rl_jax.errors import CheckpointError
from teams_rl_jax.models import nf4
from teams_rl_jax.models.hf_io import SafetensorsFile, write_safetensors
from teams_rl_jax.models.llama import CausalLM
from teams_rl_jax.models.lm import _flat, _unflat
from teams_rl_jax.sft.config import LoraSection

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def enabled(spec) -> bool:
    """Whether ``spec`` (an ``sft.config.LoraSection`` or None) asks for LoRA."""
    return spec is not None and getattr(spec, "rank", 0) > 0


def _module(lm, spec) -> CausalLM:
    # Dropout off at init: it needs no rng then, and the adapters' shapes do not depend on it.
    return CausalLM(lm.config, dtype=lm.dtype, param_dtype=lm.param_dtype, lora=dataclasses.replace(spec, dropout=0.0))


def _dummy():
    ids = jnp.zeros((1, 1), jnp.int32)
    return ids, jnp.ones_like(ids), jnp.zeros_like(ids)


def _boxed(lm, spec, collection: str = "lora"):
    """Abstract, logically-annotated variables of the LoRA model: ``"lora"`` (adapters) or ``"params"`` (base)."""
    return jax.eval_shape(lambda: _module(lm, spec).init(jax.random.key(0), *_dummy()))[collection]


def _axes(boxed) -> dict:
    specs = nn.get_partition_spec(boxed)
    return jax.tree_util.tree_map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def logical_axes(lm, spec) -> dict:
    """``{"lora": ...}`` pytree of logical-axis tuples (``("layers", "embed", "lora_rank")`` ...)."""
    return {"lora": _axes(_boxed(lm, spec))}


def shardings(lm, spec, mesh, rules=None) -> dict:
    """``NamedSharding`` of every adapter leaf: A and B follow their base weight's ``in``/``out`` axes
    (``lora_rank`` has no rule, so the small rank dim is replicated)."""
    shapes = {"lora": nn.meta.unbox(_boxed(lm, spec))}
    return shd.logical_to_sharding(logical_axes(lm, spec), mesh, rules, shapes=shapes)


def init_adapters(lm, spec, rng: jax.Array, mesh=None, rules=None) -> dict:
    """Fresh adapters ``{"lora": ...}``: A ~ U(+-1/sqrt(in)) (PEFT's init), B = 0, so the adapted model
    starts equal to the base. Under ``jit`` only the adapters are computed (the base init is dead code)."""
    if not enabled(spec):
        raise CheckpointError("init_adapters: lora.rank must be > 0")
    module = _module(lm, spec)
    out = shardings(lm, spec, mesh, rules) if mesh is not None else None
    fn = lambda key: {"lora": nn.meta.unbox(module.init(key, *_dummy())["lora"])}  # noqa: E731
    return jax.jit(fn, out_shardings=out)(rng)


def quantize_base(lm, spec, mesh=None, rules=None) -> tuple[dict, Any]:
    """``(frozen params, their shardings or None)``: ``lm.params`` with every projection kernel of the blocks
    in NF4 (``models.nf4``; QLoRA), the embeddings, head and norms as they are.

    One layer at a time (``lax.map``): the float32 transient is one layer's kernel, not the stack. The
    result is new arrays; the caller drops ``lm.params`` to free the full-precision base (until then both
    are held: bf16 + NF4 = 2.56 bytes per weight, ~17 GB for 7B). A kernel whose input dim the block does
    not divide raises ``CheckpointError`` naming it.
    """
    block = spec.quant_block
    flat = _flat(lm.params)
    targets = [p for p in flat if p[0] == "layers" and p[-1] == "kernel"]
    for p in targets:
        try:
            nf4.check_shape(flat[p].shape[1:], block, "/".join(p))
        except ValueError as e:
            raise CheckpointError(f"lora.quantize nf4: {e} (set lora.quant_block)") from None
    shardings = flat_shardings = None
    if mesh is not None:  # the quantized model's own declaration: kernel_nf4 / kernel_absmax keep the kernel's axes
        boxed = _boxed(lm, spec, "params")
        shardings = shd.logical_to_sharding(_axes(boxed), mesh, rules, shapes=nn.meta.unbox(boxed))
        flat_shardings = _flat(shardings)
    out = {p: v for p, v in flat.items() if p not in targets}
    for p in targets:
        codes_p, absmax_p = p[:-1] + ("kernel_nf4",), p[:-1] + ("kernel_absmax",)
        dest = None if mesh is None else (flat_shardings[codes_p], flat_shardings[absmax_p])
        out[codes_p], out[absmax_p] = _quantize_stack(flat[p], block, dest)
    return _unflat(out), shardings


def _quantize_stack(w, block, out_shardings):
    fn = jax.jit(lambda w: jax.lax.map(lambda layer: nf4.quantize(layer, block), w), out_shardings=out_shardings)
    return fn(w)


def num_params(adapters) -> int:
    """Number of trainable adapter parameters."""
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(adapters))


def _peft_names(path: tuple[str, ...], layer: int) -> tuple[str, str]:
    """``(lora_A name, lora_B name)`` in PEFT's key layout for adapter leaf ``path`` (without the leaf)."""
    mods = [f"layers.{layer}" if m == "layers" else m for m in path]
    prefix = "base_model.model.model." + ".".join(mods)
    return f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"


def _flat_modules(adapters: dict) -> dict[tuple[str, ...], dict]:
    """``{module path: {"lora_a": A, "lora_b": B}}`` from ``{"lora": tree}`` (or the bare tree)."""
    tree = adapters.get("lora", adapters)
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = tuple(k.key for k in path)
        out.setdefault(keys[:-1], {})[keys[-1]] = leaf
    return out


def peft_config(spec, config, base_model: str | None = None) -> dict:
    """``adapter_config.json`` contents for ``peft.LoraConfig`` (causal LM, no bias, plain alpha/r scaling)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": int(spec.rank),
        "lora_alpha": float(spec.alpha),
        "lora_dropout": float(spec.dropout),
        "target_modules": sorted(spec.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def _host(x) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_peft_adapter(lm, adapters: dict, path: str | Path, *, base_model: str | None = None,
                      dtype: Any = np.float32) -> Path:
    """Write a PEFT adapter dir (``adapter_config.json`` + ``adapter_model.safetensors``) that
    ``peft.PeftModel.from_pretrained(base, path)`` loads. ``adapters``: ``{"lora": ...}`` (or a params tree
    holding that key); ``lm.lora`` gives rank/alpha/targets. Multi-host: all processes call, process 0 writes."""
    spec = lm.lora
    if not enabled(spec):
        raise CheckpointError("save_peft_adapter: the LM has no LoRA spec (lm.replace(lora=...))")
    if "lora" not in adapters:
        raise CheckpointError("save_peft_adapter: no 'lora' adapters in the given tree")
    modules = {k: jax.tree_util.tree_map(_host, v) for k, v in _flat_modules({"lora": adapters["lora"]}).items()}
    dtype = np.dtype(dtype)
    specs, tensors = [], {}
    for mod, ab in sorted(modules.items()):
        for layer in range(lm.config.num_hidden_layers):
            name_a, name_b = _peft_names(mod, layer)
            tensors[name_a] = ab["lora_a"][layer].T  # [r, in]
            tensors[name_b] = ab["lora_b"][layer].T  # [out, r]
    for name in sorted(tensors):
        specs.append((name, tuple(tensors[name].shape), dtype))
    path = Path(path)
    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
        (path / ADAPTER_CONFIG).write_text(json.dumps(peft_config(spec, lm.config, base_model), indent=2) + "\n")
        write_safetensors(path / ADAPTER_WEIGHTS, specs, lambda n: tensors[n].astype(dtype))
    return path


def load_peft_adapter(lm, path: str | Path) -> tuple[dict, Any]:
    """``({"lora": adapters}, spec)`` from a PEFT adapter dir written by :func:`save_peft_adapter` (or by
    PEFT for the same targets on every layer); errors name the file and the missing tensor."""
    path = Path(path)
    cfg_path = path / ADAPTER_CONFIG
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: cannot read adapter config ({e})") from None
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("use_rslora"):
        raise CheckpointError(f"{cfg_path}: only plain LoRA adapters are supported")
    targets = cfg.get("target_modules")
    targets = [targets] if isinstance(targets, str) else list(targets or [])
    spec = LoraSection(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0)),
                       targets=tuple(targets))
    spec.validate()
    f = SafetensorsFile(path / ADAPTER_WEIGHTS)
    shapes = nn.meta.unbox(_boxed(lm, spec))
    out: dict = {}
    for mod, ab in _flat_modules({"lora": shapes}).items():
        stacks = {"lora_a": [], "lora_b": []}
        for layer in range(lm.config.num_hidden_layers):
            for leaf, name in zip(("lora_a", "lora_b"), _peft_names(mod, layer)):
                if name not in f.header:
                    raise CheckpointError(f"{path / ADAPTER_WEIGHTS}: tensor {name!r} is missing")
                stacks[leaf].append(np.asarray(f.read(name), np.float32).T)
        node = out
        for k in mod:
            node = node.setdefault(k, {})
        for leaf in stacks:
            arr = np.stack(stacks[leaf])
            if arr.shape != ab[leaf].shape:
                raise CheckpointError(f"{path / ADAPTER_WEIGHTS}: {'/'.join(mod)} {leaf} has shape {arr.shape}, "
                                      f"the model needs {ab[leaf].shape}")
            node[leaf] = jnp.asarray(arr)
    return {"lora": out}, spec
