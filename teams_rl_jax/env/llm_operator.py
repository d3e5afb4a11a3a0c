"""LLM operator: the instructor LM rewrites an instruction with the chosen operation's prompt template.

Everything happens inside jit on fixed-size buffers: for each row the prompt
``prefix[op] + instruction + suffix[op]`` is assembled left-padded (``env.assemble``), the
instructor continues it with ``teams_rl_jax.generate`` (KV cache, ``while_loop`` decode), and the
continuation up to EOS becomes the new instruction buffer. Each call costs one instructor query per
row. Same interface as the token-edit operator: ``apply(key, op_ids, tokens, lengths, params)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.struct as struct
import jax
import jax.numpy as jnp
import numpy as np

from teams_rl_jax.env.assemble import concat_left_padded, cut_at_eos
from teams_rl_jax.generation import generate


@struct.dataclass
class LLMOperatorParams:
    """Traced inputs of the operator: instructor weights and the tokenized templates."""

    lm_params: Any
    prefix: jax.Array  # [A, P] right-padded template text before the instruction
    prefix_len: jax.Array  # [A]
    suffix: jax.Array  # [A, S] template text after the instruction (ends where the answer starts)
    suffix_len: jax.Array  # [A]


def tokenize_pieces(tokenizer, texts: Sequence[str], add_bos: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``[N, maxlen]`` token buffer and lengths for ``texts`` (no special tokens)."""
    rows = []
    for i, t in enumerate(texts):
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        if add_bos and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids
        rows.append(ids)
    width = max(1, max(len(r) for r in rows))
    buf = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        buf[i, : len(r)] = r
    return buf, np.asarray([len(r) for r in rows], np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class LLMOperator:
    """Instructor-LM operator over right-padded instruction buffers ``[B, max_len]``.

    Build with :meth:`create`; ``params`` (an :class:`LLMOperatorParams`) is passed at call time so
    the weights are traced arguments, not constants baked into the compiled step.
    """

    lm: Any
    max_len: int
    max_new_tokens: int
    prompt_width: int
    eos_ids: tuple[int, ...]
    pad_id: int = 0
    temperature: float = 0.7
    top_p: float = 0.95

    @classmethod
    def create(cls, lm, tokenizer, templates: Sequence[tuple[str, str]], *, max_len: int,
               max_new_tokens: int | None = None, temperature: float = 0.7, top_p: float = 0.95):
        """Operator + params from an instructor ``lm``, its tokenizer and ``(prefix, suffix)`` per operation."""
        prefix, prefix_len = tokenize_pieces(tokenizer, [p for p, _ in templates], add_bos=True)
        suffix, suffix_len = tokenize_pieces(tokenizer, [s for _, s in templates])
        eos = lm.config.eos_token_id if lm.config.eos_token_id is not None else tokenizer.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (tuple, list)) else (int(eos),)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        op = cls(lm=lm, max_len=max_len, max_new_tokens=max_new_tokens or max_len,
                 prompt_width=int(prefix.shape[1] + max_len + suffix.shape[1]), eos_ids=eos_ids, pad_id=int(pad),
                 temperature=temperature, top_p=top_p)
        params = LLMOperatorParams(lm.params, jnp.asarray(prefix), jnp.asarray(prefix_len), jnp.asarray(suffix),
                                   jnp.asarray(suffix_len))
        return op, params

    def prompts(self, op_ids: jax.Array, tokens: jax.Array, lengths: jax.Array, params: LLMOperatorParams):
        """Left-padded instructor prompts ``(ids, mask) [B, prompt_width]`` for each row's operation."""
        pieces = [
            (params.prefix[op_ids], params.prefix_len[op_ids]),
            (tokens, lengths),
            (params.suffix[op_ids], params.suffix_len[op_ids]),
        ]
        return concat_left_padded(pieces, self.prompt_width, self.pad_id)

    def apply(self, key: jax.Array, op_ids: jax.Array, tokens: jax.Array, lengths: jax.Array,
              params: LLMOperatorParams):
        """Rewrite each row: ``(new_tokens [B, max_len], new_lengths [B], queries [B] = 1)``."""
        ids, mask = self.prompts(op_ids, tokens, lengths, params)
        out = generate(self.lm, params.lm_params, ids, mask, max_new_tokens=self.max_new_tokens, rng=key,
                       temperature=self.temperature, top_p=self.top_p, eos_token_id=self.eos_ids,
                       pad_token_id=self.pad_id)
        new_tokens, new_lengths = cut_at_eos(out, jnp.asarray(self.eos_ids, jnp.int32), self.max_len, self.pad_id)
        # An empty rewrite keeps the old instruction (and still cost its query).
        empty = new_lengths == 0
        new_tokens = jnp.where(empty[:, None], tokens, new_tokens)
        new_lengths = jnp.where(empty, lengths, new_lengths)
        return new_tokens, new_lengths, jnp.ones(op_ids.shape, jnp.float32)
