"""``ModelConfig``: the causal LM's hyper-parameters, read from and written to Hugging Face ``config.json``.

Two dialects exist in the wild and both are read:

* transformers 4.x (most hub checkpoints): top-level ``rope_theta`` and ``rope_scaling``
  (``{"type"|"rope_type": "linear"|"llama3", "factor": ..}``);
* transformers 5.x: ``rope_parameters = {"rope_type": .., "rope_theta": .., ...}``.

We write the 5.x dialect plus the 4.x keys, so either transformers major loads our exports.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from teams_rl_jax.errors import CheckpointError
from teams_rl_jax.models.hf_io import read_config_json

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama 1/2/3, Mistral, Qwen2).

    ``rope_scaling`` is a tuple of sorted ``(key, value)`` pairs (hashable, so the config can be a
    static jit argument); use :meth:`rope_dict` to read it.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    model_type: str = "llama"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Llama's flag: bias on q/k/v/o
    qkv_bias: bool = False  # Qwen2: bias on q/k/v only
    mlp_bias: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] | None = None  # per layer; None = all layers when sliding_window is set
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    # Runtime choices, not architecture: never read from or written to config.json.
    attention_impl: str = "auto"  # models.attention.ATTENTION_IMPLS: auto | xla | cudnn | splash | splash_interpret
    scan_unroll: int = 1  # layers per iteration of the layer scan; 0 = all layers (no loop at all)

    def rope_dict(self) -> dict:
        """The rope scaling parameters as a dict (empty for plain RoPE)."""
        return dict(self.rope_scaling or ())

    @property
    def rope_type(self) -> str:
        """``default``, ``linear`` or ``llama3``."""
        return self.rope_dict().get("rope_type", "default")

    def num_params(self) -> int:
        """Parameter count (embedding included, as HF counts it)."""
        d, f, v, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d
        if self.attention_bias:
            attn += q + 2 * kv + d
        elif self.qkv_bias:
            attn += q + 2 * kv
        mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + L * per_layer + d + head

    def layer_is_sliding(self) -> tuple[bool, ...]:
        """Which layers use the sliding-window mask."""
        if not self.sliding_window:
            return (False,) * self.num_hidden_layers
        return self.sliding_layers or (True,) * self.num_hidden_layers

    # ---- Hugging Face config.json ------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Parse a Hugging Face ``config.json`` dict (4.x or 5.x dialect)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{source}: unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise CheckpointError(f"{source}: unsupported hidden_act {act!r} (only silu)")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(hf.get(key), int):
                raise CheckpointError(f"{source}: missing or non-integer key {key!r}")
        heads = hf["num_attention_heads"]
        kv_heads = hf.get("num_key_value_heads") or heads
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        if heads % kv_heads:
            raise CheckpointError(f"{source}: num_attention_heads={heads} not a multiple of num_key_value_heads={kv_heads}")

        # RoPE: 5.x `rope_parameters` wins; else 4.x `rope_theta` + `rope_scaling`.
        rp = hf.get("rope_parameters")
        if isinstance(rp, dict) and "rope_type" not in rp and "rope_theta" not in rp:
            rp = None  # per-layer-type dict (not used by these architectures)
        if rp:
            rope = dict(rp)
            theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        else:
            theta = float(hf.get("rope_theta", 10000.0))
            rope = dict(hf.get("rope_scaling") or {})
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope.pop("type", None)
        rope_type = rope.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise CheckpointError(
                f"{source}: unsupported rope type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if rope_type == "default":
            rope = {}
        elif "factor" not in rope:
            raise CheckpointError(f"{source}: rope scaling {rope_type!r} needs 'factor'")
        if rope_type == "llama3":
            rope.setdefault("low_freq_factor", 1.0)
            rope.setdefault("high_freq_factor", 4.0)
            rope.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
        rope = {k: v for k, v in rope.items() if v is not None}

        sliding_window = None
        sliding_layers = None
        if model_type == "mistral":
            sliding_window = hf.get("sliding_window")
        elif model_type == "qwen2" and hf.get("use_sliding_window"):
            sliding_window = hf.get("sliding_window")
            layer_types = hf.get("layer_types")
            if layer_types:
                sliding_layers = tuple(t == "sliding_attention" for t in layer_types)
            else:
                mwl = hf.get("max_window_layers", 0)
                sliding_layers = tuple(i >= mwl for i in range(hf["num_hidden_layers"]))
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(eos)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            model_type=model_type,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=tuple(sorted(rope.items())) or None,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)) if model_type == "llama" else False,
            qkv_bias=model_type == "qwen2",
            mlp_bias=bool(hf.get("mlp_bias", False)) if model_type == "llama" else False,
            sliding_window=sliding_window,
            sliding_layers=sliding_layers,
            hidden_act="silu",
            initializer_range=float(hf.get("initializer_range", 0.02)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict that both transformers 4.x and 5.x read."""
        rope = self.rope_dict()
        hf: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(rope, type=rope["rope_type"]) if rope else None,
            "rope_parameters": {"rope_type": "default", **rope, "rope_theta": self.rope_theta},
            "torch_dtype": "float32",
        }
        if self.model_type == "llama":
            hf.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        if self.model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            hf["use_sliding_window"] = bool(self.sliding_window)
            hf["sliding_window"] = self.sliding_window
            if self.sliding_window:
                hf["layer_types"] = [
                    "sliding_attention" if s else "full_attention" for s in self.layer_is_sliding()
                ]
        return hf

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """From our own field names, or else an HF ``config.json``-style dict."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        if required <= set(d) <= names and not isinstance(d.get("rope_scaling"), dict):
            return cls(**d)
        if "model_type" in d:
            return cls.from_hf(d, source="config")
        raise CheckpointError(f"model config: unknown key {sorted(set(d) - names)[0]!r}")


def read_hf_config(path: str | Path) -> ModelConfig:
    """Read ``<dir>/config.json`` (or a path to a config.json file) into a ModelConfig."""
    hf, cfg_path = read_config_json(path)
    return ModelConfig.from_hf(hf, source=str(cfg_path))
