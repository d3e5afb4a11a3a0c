"""SFT stage configuration (``SFTConfig``): model, data, optimizer, mesh, checkpoints, run length."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from teams_rl_jax.data.config import DataConfig
from teams_rl_jax.errors import ConfigError

# A tiny random Llama for the offline default and CPU tests (HF config.json keys).
TINY_MODEL = dict(model_type="llama", vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.02,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)


@dataclass(frozen=True)
class ModelSection:
    """Which LM to fine-tune: a local HF dir (``path``) or a random init from ``config`` (HF keys)."""

    path: str | None = None
    config: dict[str, Any] | None = None
    tokenizer: str | None = None  # default: the model dir; for a random init, built from the data
    dtype: Literal["float32", "bfloat16"] = "float32"  # storage of params and optimizer state
    compute_dtype: Literal["float32", "bfloat16"] | None = None  # bfloat16 here = mixed precision
    # models.llama.REMAT_POLICIES: what a layer's backward keeps ("none" keeps all, "full" only inputs)
    remat: Literal["none", "full", "dots", "dots_saveable", "dots_with_no_batch_dims_saveable"] = "none"
    # models.attention: auto = cuDNN flash on GPU, Pallas splash on TPU, XLA elsewhere
    attention: Literal["auto", "xla", "cudnn", "splash", "splash_interpret"] = "auto"
    # layers per step of the layer scan; 0 = all (no loop: faster steps, compile time grows with depth)
    scan_unroll: int = 1

    def validate(self) -> None:
        """Exactly one of path/config."""
        if (self.path is None) == (self.config is None):
            raise ConfigError("model: set exactly one of 'path' (local HF dir) or 'config' (random init)")


@dataclass(frozen=True)
class OptimSection:
    """AdamW with linear warm-up then cosine (or constant/linear) decay, global-norm clipping."""

    lr: float = 2e-5
    warmup_steps: int = 2
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    end_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0  # never applied to norms and biases
    clip_norm: float | None = 1.0
    # Adam moments (and clipping) in float32 even for bf16 params; "param" = the params' dtype.
    moments_dtype: Literal["float32", "param"] = "float32"

    def validate(self) -> None:
        """Ranges."""
        if self.lr <= 0 or self.warmup_steps < 0 or not 0 <= self.end_lr_ratio <= 1:
            raise ConfigError("optim: need lr > 0, warmup_steps >= 0, 0 <= end_lr_ratio <= 1")


@dataclass(frozen=True)
class MeshSection:
    """Device mesh sizes; one may be -1 (all remaining devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclass(frozen=True)
class CheckpointSection:
    """Orbax checkpoints under run_dir/sft/ckpt: every ``every`` steps, keep ``keep``, async writes."""

    every: int = 100
    keep: int = 3
    async_save: bool = True


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSection:
    """LoRA SFT (``sft.lora``, on when ``rank > 0``): the base is frozen (stored in ``model.dtype``, bfloat16
    for 7B on one GPU) and only rank-``rank`` adapters on ``targets`` are trained, saved and resumed; the update
    is scaled by ``alpha / rank`` and its input dropped out with ``dropout``. ``export``: ``merged`` (full weights W + (alpha/r) A B in run/sft/hf),
    ``adapter`` (a PEFT adapter dir in run/sft/adapter) or ``both``. Default targets: every linear layer of the
    blocks, as QLoRA (Dettmers et al. 2023) found necessary to match full fine-tuning.

    ``quantize: nf4`` is QLoRA proper: every linear layer of the blocks is stored frozen in 4-bit NormalFloat
    (``quant_block`` weights per absmax, ``models.nf4``; 0.56 byte per weight instead of bf16's 2), the
    embeddings, head and norms stay in ``model.dtype``, and the adapters train against the quantized base.
    The merged export adds the adapters to the *dequantized* base (the model that was trained); the PEFT
    adapter is the usual QLoRA artifact for the original base."""

    rank: int = 0  # 0 = off (full fine-tuning); 8-64 typical
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = LORA_TARGETS
    export: Literal["merged", "adapter", "both"] = "both"
    quantize: Literal["none", "nf4"] = "none"  # nf4: the frozen base in 4 bits (QLoRA)
    quant_block: int = 64  # weights per NF4 absmax (QLoRA's 64); must divide every projection's input dim

    def validate(self) -> None:
        """Rank >= 0, dropout in [0, 1), known target names, an even NF4 block."""
        if self.rank < 0 or not 0 <= self.dropout < 1:
            raise ConfigError(f"need rank >= 0 and 0 <= dropout < 1 (got rank={self.rank}, dropout={self.dropout})")
        if self.quant_block < 2 or self.quant_block % 2:
            raise ConfigError(f"quant_block must be even and >= 2 (got {self.quant_block})")
        if self.quantize != "none" and self.rank == 0:
            raise ConfigError(f"quantize: {self.quantize} needs rank > 0 (a 4-bit base trains only through adapters)")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"targets: unknown {bad[0] if bad else 'empty list'!r} "
                              f"(use some of {', '.join(LORA_TARGETS)})")


@dataclass(frozen=True)
class SFTConfig:
    """The SFT stage. ``global_batch`` rows (of ``max_seq_len`` tokens) per optimizer step, split into
    ``grad_accum`` micro-batches; ``epochs`` over the data unless ``max_steps`` is set."""

    model: ModelSection = field(default_factory=lambda: ModelSection(config=dict(TINY_MODEL)))
    # data.path "auto": run_dir/data/generated.jsonl if the generate stage wrote it, else the bundled demo set
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    global_batch: int = 8
    grad_accum: int = 1
    epochs: float = 3.0
    max_steps: int | None = None
    seed: int = 0
    log_every: int = 1
    ce_chunk: int = 1024  # tokens per chunk of the fused head + cross-entropy; 0 = full [B,T,V] logits
    peak_tflops: float | None = None  # per device, for the MFU estimate (e.g. 989 for H100 bf16 dense)
    export: bool = True
    export_dtype: Literal["float32", "bfloat16", "float16"] | None = None  # default: the compute dtype
    export_shard_size: int | str = "5GB"  # safetensors shards (bytes, or "5GB" / "500MB")
    lora: LoraSection = field(default_factory=LoraSection)  # lora.rank > 0: LoRA SFT instead of full fine-tuning
    tensorboard: bool = True

    def validate(self) -> None:
        """Batch/accumulation consistency."""
        if self.global_batch < 1 or self.grad_accum < 1 or self.global_batch % self.grad_accum:
            raise ConfigError(f"global_batch ({self.global_batch}) must be a positive multiple of grad_accum "
                              f"({self.grad_accum})")
        if self.epochs <= 0 and self.max_steps is None:
            raise ConfigError("set epochs > 0 or max_steps")
