"""LLM operator: the instructor LM rewrites an instruction with the chosen operation's prompt template.

Everything happens inside jit on fixed-size buffers: for each row the prompt
``prefix[op] + instruction + suffix[op]`` is assembled left-padded (``env.assemble``), the
instructor continues it with ``teams_rl_jax.generate`` (KV cache, jitted decode loop), and the
continuation up to the first EOS id becomes the new instruction buffer. Each call costs one
instructor query per row. Same interface as the token-edit operator:
``apply(key, op_ids, tokens, lengths, params) -> (tokens, lengths, queries)`` (a truncated rewrite
comes back as the old instruction); :meth:`LLMOperator.rewrite` returns the rewrites as generated
plus a ``truncated`` flag per row.

* The templates are wrapped in the instructor's chat format (its chat template, else Vicuna v1.1:
  ``data.chat.render_chat``) and their ids taken in context and verified (``env.pieces``).
* EOS is every EOS id of the checkpoint (``data.tokenizer.eos_token_ids``: Llama-3 has two); the pad id
  is never one of them (``choose_pad_id``), and padding never ends a rewrite.
* ``max_new_tokens`` is its own setting (the instructor may be allowed more tokens than fit, or
  fewer). A rewrite with no EOS within ``max_new_tokens`` tokens, or longer than the ``max_len``
  buffer, is *truncated*: flagged in :class:`Rewrite` so the env eliminates it (rule ``truncated``)
  and counts it, instead of silently keeping a cut-off instruction.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.struct as struct
import jax
import jax.numpy as jnp
import numpy as np

from teams_rl_jax.data.chat import render_chat
from teams_rl_jax.data.tokenizer import choose_pad_id, eos_token_ids, tokenizer_fingerprint
from teams_rl_jax.env.assemble import concat_left_padded, cut_at_eos
from teams_rl_jax.env.pieces import place_slots, template_ids
from teams_rl_jax.errors import ConfigError
from teams_rl_jax.generation import generate


@struct.dataclass
class Rewrite:
    """What the instructor produced for a batch: new buffers, lengths, queries spent, and ``truncated``
    (bool [B]: no EOS within ``max_new_tokens``, or longer than the buffer)."""

    tokens: jax.Array
    lengths: jax.Array
    queries: jax.Array
    truncated: jax.Array


@struct.dataclass
class LLMOperatorParams:
    """Traced inputs of the operator: instructor weights and the tokenized templates."""

    lm_params: Any
    prefix: jax.Array  # [A, P] right-padded template text before the instruction
    prefix_len: jax.Array  # [A]
    suffix: jax.Array  # [A, S] template text after the instruction (ends where the answer starts)
    suffix_len: jax.Array  # [A]


def pad_pieces(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``[N, maxlen]`` buffer and lengths of token-id rows."""
    width = max(1, max(len(r) for r in rows))
    buf = np.full((len(rows), width), pad_id, np.int32)
    for i, r in enumerate(rows):
        buf[i, : len(r)] = list(r)
    return buf, np.asarray([len(r) for r in rows], np.int32)


def operation_piece_ids(tokenizer, templates: Sequence[tuple[str, str]], *, chat: bool = True):
    """In-context, verified piece ids per operation (``env.pieces.TemplateIds``: ``pieces = (prefix ids,
    suffix ids)``, ``text_pieces`` the text they encode): each ``(prefix, suffix)`` content template
    wrapped in the instructor's chat format."""
    out = []
    for i, (prefix, suffix) in enumerate(templates):
        content = prefix + "{instruction}" + suffix

        def render(values, seps, content=content):
            body = place_slots(content, ("instruction",), seps).strip().replace("{instruction}", values[0])
            return render_chat(tokenizer if chat else None, [{"role": "user", "content": body}])

        out.append(template_ids(tokenizer, render, 1, what=f"instructor prompt {i}"))
    return out


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
    pad_id: int
    temperature: float = 0.7
    top_p: float = 0.95
    tokenizer_fingerprint: str | None = None  # compared with the env's tokenizer (judge.check_role_tokenizers)

    def __post_init__(self):
        if not self.eos_ids:
            raise ConfigError("LLMOperator: eos_ids is empty (the rewrite would never end)")
        if self.pad_id in self.eos_ids:
            raise ConfigError(f"LLMOperator: pad id {self.pad_id} is an EOS id {list(self.eos_ids)}; pad is never EOS")
        if self.max_new_tokens < 1:
            raise ConfigError(f"LLMOperator: max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @classmethod
    def create(cls, lm, tokenizer, templates: Sequence[tuple[str, str]], *, max_len: int,
               max_new_tokens: int | None = None, temperature: float = 0.7, top_p: float = 0.95,
               chat: bool = True, checkpoint: str | None = None):
        """Operator + params from an instructor ``lm``, its tokenizer and ``(prefix, suffix)`` per operation.

        ``max_new_tokens`` (default ``max_len``) bounds the instructor's answer, independently of the
        buffer. ``chat``: wrap the templates in the tokenizer's chat template when it has one (False:
        always Vicuna v1.1 wording, ignoring the checkpoint's template). ``checkpoint``: the instructor's dir, for the EOS ids of its
        generation_config.json (default: the tokenizer's dir).
        """
        eos_ids = eos_token_ids(tokenizer, lm.config, checkpoint)
        pad = choose_pad_id(tokenizer, eos_ids)
        pairs = [t.pieces for t in operation_piece_ids(tokenizer, templates, chat=chat)]
        prefix, prefix_len = pad_pieces([p for p, _ in pairs], pad)
        suffix, suffix_len = pad_pieces([s for _, s in pairs], pad)
        op = cls(lm=lm, max_len=max_len, max_new_tokens=int(max_new_tokens or max_len),
                 prompt_width=int(prefix.shape[1] + max_len + suffix.shape[1]), eos_ids=tuple(eos_ids), pad_id=pad,
                 temperature=temperature, top_p=top_p, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
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

    def rewrite(self, key: jax.Array, op_ids: jax.Array, tokens: jax.Array, lengths: jax.Array,
                params: LLMOperatorParams) -> Rewrite:
        """Rewrite each row; a :class:`Rewrite` with ``tokens [B, max_len]`` and ``truncated [B]``."""
        ids, mask = self.prompts(op_ids, tokens, lengths, params)
        out = generate(self.lm, params.lm_params, ids, mask, max_new_tokens=self.max_new_tokens, rng=key,
                       temperature=self.temperature, top_p=self.top_p, eos_token_id=self.eos_ids,
                       pad_token_id=self.pad_id)
        new_tokens, new_lengths, truncated = cut_at_eos(out, jnp.asarray(self.eos_ids, jnp.int32), self.max_len,
                                                        self.pad_id, return_truncated=True)
        # An empty rewrite keeps the old instruction (and still cost its query; no_gain then eliminates it).
        empty = new_lengths == 0
        new_tokens = jnp.where(empty[:, None], tokens, new_tokens)
        new_lengths = jnp.where(empty, lengths, new_lengths)
        return Rewrite(new_tokens, new_lengths, jnp.ones(op_ids.shape, jnp.float32), truncated)

    reports_truncated = True  # the env asks apply() for the truncated flags (its "truncated" reason)

    def apply(self, key: jax.Array, op_ids: jax.Array, tokens: jax.Array, lengths: jax.Array,
              params: LLMOperatorParams, with_truncated: bool = False):
        """Rewrite each row: ``(new_tokens [B, max_len], new_lengths [B], queries [B] = 1)`` (the operator
        interface). A truncated rewrite is replaced by the old instruction here, so a cut-off text never
        enters the env (its ``no_gain`` rule then drops the step). ``with_truncated``: also return
        ``served`` (-1: unknown) and ``truncated [B]``, which the env reports as elimination reason
        ``truncated``."""
        r = self.rewrite(key, op_ids, tokens, lengths, params)
        keep_old = r.truncated
        out = (jnp.where(keep_old[:, None], tokens, r.tokens), jnp.where(keep_old, lengths, r.lengths), r.queries)
        if with_truncated:
            return out + (jnp.full(lengths.shape, -1, jnp.int32), keep_old)
        return out
