"""The offline demo's expert: a tiny random Llama + word tokenizer, served like a 7B checkpoint.

``python -m teams_rl_jax.train`` with the packaged default config (``offline_demo: true``) needs no
model download: a ``roles.expert`` left unset becomes this model, saved once under the run dir
(``RunLayout.tiny_expert``) and loaded through the same ``FlaxBackend`` path as a real checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import jax

from teams_rl_jax.backends.config import RoleConfig
from teams_rl_jax.env.seeds import offline_tokenizer
from teams_rl_jax.data.seeds import read_seeds
from teams_rl_jax.layout import RunLayout
from teams_rl_jax.models import init, save_pretrained

TINY_LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_expert(run_dir: str | Path, seeds_path: str | None = None) -> Path:
    """A tiny random Llama + word tokenizer in ``RunLayout(run_dir).tiny_expert`` (made once, seeded).

    The tokenizer is word-level over the seeds and the env's phrase banks (what evolved prompts
    contain); the model answers with random words.
    """
    path = RunLayout(run_dir).tiny_expert
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    tok = offline_tokenizer([s.text for s in read_seeds(seeds_path)], vocab_size=4096)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    lm = init(dict(TINY_LLAMA, vocab_size=(len(tok) + 63) // 64 * 64), jax.random.key(0))
    save_pretrained(lm, tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def with_demo_roles(cfg: Any, run_dir: str | Path) -> Any:
    """``cfg`` (a ``TrainConfig``) with the demo's expert filled in where ``roles.expert`` is unset."""
    if not cfg.offline_demo or cfg.roles.expert is not None or "generate" not in cfg.stages:
        return cfg
    ckpt = tiny_expert(run_dir, cfg.seeds)
    expert = RoleConfig(backend="flax", checkpoint=str(ckpt), dtype="float32", max_batch=64, model="tiny-random-llama",
                        max_new_tokens=48)  # a random model's answer is noise: keep it short
    return dataclasses.replace(cfg, roles=dataclasses.replace(cfg.roles, expert=expert))
