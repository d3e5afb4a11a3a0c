"""Pure-jnp assembly of LM prompts from variable-length token pieces (inside jit).

The LLM operator and the reviewer judge build prompts like ``template_prefix + instruction +
template_suffix`` for a whole batch at once. Pieces are right-padded buffers with lengths; the result
is a *left-padded* buffer (what ``generate`` and last-token scoring expect) of a fixed width.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def concat_left_padded(pieces: Sequence[tuple[jax.Array, jax.Array]], width: int, pad_id: int = 0):
    """Concatenate right-padded pieces ``(tokens [B, Li], lengths [B])`` into ``[B, width]``, left-padded.

    Returns ``(ids int32 [B, width], mask int32 [B, width])``. If the total is longer than ``width``
    the *start* is cut (the end of a prompt, where the answer begins, must survive).
    """
    B = pieces[0][0].shape[0]
    lengths = [jnp.broadcast_to(jnp.asarray(n, jnp.int32), (B,)) for _, n in pieces]
    total = sum(lengths)
    # Output slot j holds logical token j - offset of the concatenation (negative = padding).
    offset = width - total  # [B]
    j = jnp.arange(width)[None, :] - offset[:, None]  # [B, W] logical index
    ids = jnp.full((B, width), pad_id, jnp.int32)
    start = jnp.zeros((B,), jnp.int32)
    for (tokens, _), n in zip(pieces, lengths):
        tokens = jnp.broadcast_to(tokens, (B, tokens.shape[-1])) if tokens.ndim == 1 else tokens
        local = j - start[:, None]
        inside = (local >= 0) & (local < n[:, None])
        gathered = jnp.take_along_axis(tokens, jnp.clip(local, 0, tokens.shape[1] - 1), axis=1)
        ids = jnp.where(inside, gathered, ids)
        start = start + n
    mask = (j >= 0).astype(jnp.int32)
    return ids.astype(jnp.int32), mask


def cut_at_eos(tokens: jax.Array, eos_ids: jax.Array, width: int, pad_id: int, *, return_truncated: bool = False):
    """Generated ``tokens [B, N]`` -> right-padded ``[B, width]`` up to (excluding) the first EOS, and lengths.

    Only ``eos_ids`` end a row: the pad id is not an end marker (``generate`` writes pad only *after* an
    EOS, and a pad id may be a real token: id 0 is "!" in Llama-3). With ``return_truncated`` also
    ``truncated bool [B]``: no EOS in the ``N`` generated tokens (cut by ``max_new_tokens``), or more
    tokens before it than fit in ``width``.
    """
    eos_ids = jnp.asarray(eos_ids, jnp.int32).reshape(-1)
    is_eos = jnp.any(tokens[..., None] == eos_ids, axis=-1)
    found = is_eos.any(axis=1)
    full = jnp.where(found, jnp.argmax(is_eos, axis=1), tokens.shape[1])
    n = jnp.minimum(full, width).astype(jnp.int32)
    if tokens.shape[1] < width:
        tokens = jnp.pad(tokens, ((0, 0), (0, width - tokens.shape[1])), constant_values=pad_id)
    out = tokens[:, :width]
    out = jnp.where(jnp.arange(width)[None, :] < n[:, None], out, pad_id)
    if return_truncated:
        return out.astype(jnp.int32), n, ~found | (full > width)
    return out.astype(jnp.int32), n
