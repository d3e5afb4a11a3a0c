"""Tiny random Hugging Face (torch) models saved to disk, as references for our Flax LM.

``config.json`` is written in one of the two dialects found in the wild: ``"v5"`` (what
transformers 5.x writes: ``rope_parameters``) or ``"v4"`` (``rope_theta`` + ``rope_scaling``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            initializer_range=0.3, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)

VARIANTS = {
    # GQA (4 heads / 2 KV heads) with llama3 rope scaling.
    "llama3": dict(model_type="llama", rope_parameters=dict(
        rope_type="llama3", rope_theta=50000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    "llama_linear_tied": dict(model_type="llama", tie_word_embeddings=True,
                              rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
    "mistral": dict(model_type="mistral", sliding_window=4, head_dim=16,
                    rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    "qwen2": dict(model_type="qwen2", rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
}


def to_v4_dialect(cfg: dict) -> dict:
    """Rewrite a 5.x config dict into the 4.x dialect (rope_theta + rope_scaling)."""
    cfg = dict(cfg)
    rp = dict(cfg.pop("rope_parameters", None) or {})
    cfg["rope_theta"] = rp.pop("rope_theta", 10000.0)
    kind = rp.pop("rope_type", "default")
    cfg["rope_scaling"] = None if kind == "default" else {"type": kind, **rp}
    return cfg


def make_hf_model(tmp: Path, variant: str, dialect: str = "v5", seed: int = 0, dtype=None, **overrides):
    """Build, save and return ``(torch_model, path)`` for a tiny random model of ``variant``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    kw = {**BASE, **VARIANTS[variant], **overrides}
    model_type = kw.pop("model_type")
    cls = transformers.AutoConfig.for_model(model_type, **kw)
    model = transformers.AutoModelForCausalLM.from_config(cls).eval()
    # Random (not zero) norm weights and biases, so a wrong mapping cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    if dtype is not None:
        model = model.to(dtype)
    path = Path(tmp) / f"{variant}_{dialect}"
    model.save_pretrained(path, max_shard_size=overrides.pop("max_shard_size", None) or "2GB")
    if dialect == "v4":
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(to_v4_dialect(cfg)))
        # The reference must be what transformers makes of the 4.x file.
        model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        if dtype is not None:
            model = model.to(dtype)
    return model, path


def left_padded_batch(rng: np.random.Generator, lengths, vocab: int, pad: int = 0):
    """Random ids [B, T] left-padded to max(lengths), 0/1 mask and positions (0 on padding)."""
    T = max(lengths)
    ids = np.full((len(lengths), T), pad, np.int64)
    mask = np.zeros((len(lengths), T), np.int64)
    pos = np.zeros((len(lengths), T), np.int64)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = rng.integers(3, vocab, size=n)
        mask[b, T - n:] = 1
        pos[b, T - n:] = np.arange(n)
    return ids, mask, pos


def torch_logits(model, ids, mask, pos) -> np.ndarray:
    """Reference logits (float64 numpy) from a transformers model."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                    position_ids=torch.as_tensor(pos))
    return out.logits.double().numpy()
