"""Example -> token ids + response-only loss mask, with a stated truncation policy.

Layout of one sequence: ``[BOS] prompt response [EOS]`` (BOS only if the tokenizer has one). The
template renders the example as ``(text, is_response)`` pieces; the whole text is tokenized in one
call and each token is labelled by the piece its first character falls in (fast tokenizers' offset
mapping), so the ids are exactly the tokenizer's natural tokenization of the training text and the
prompt's ids are what the same prompt gives at inference. If a token straddles a prompt/response
boundary (or the tokenizer is not a fast one) the pieces are tokenized separately and concatenated
instead, so no response token is ever hidden in the prompt.

``loss_mask`` is 1 on response tokens and on the final EOS (the model must learn to stop), 0 on BOS
and the prompt. Multi-turn (Vicuna) examples get loss on every assistant reply, as in FastChat.
Template ``chat`` is the exception to this layout: the ids are the chat template's rendering, BOS/EOS
included, and the mask is 1 on assistant turns only (:mod:`teams_rl_jax.data.chat_sft`).

Truncation policy for a sequence longer than ``max_seq_len``:

* if fewer than ``min_response_tokens`` response tokens fit (the prompt alone, up to the first
  response, nearly fills the row), the example is **dropped**: a prompt with no answer teaches nothing;
* otherwise the tail is **cut** at ``max_seq_len`` (losing the EOS: the model should not learn to stop
  mid-answer).

Both are counted, with the number of tokens cut, in :class:`TokenizeStats`, which the SFT stage logs.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Sequence

import numpy as np

from teams_rl_jax.data.chat_sft import encode_chat, example_messages, resolve_chat_template
from teams_rl_jax.data.example import Example
from teams_rl_jax.data.templates import VICUNA_SEP2, get_template
from teams_rl_jax.errors import ConfigError

_BATCH = 1024  # texts per tokenizer call (fast tokenizers batch in Rust)


@dataclasses.dataclass
class TokenizeStats:
    """Counts over a dataset: examples kept / truncated / dropped, tokens kept and cut, loss tokens."""

    examples: int = 0
    kept: int = 0  # includes the truncated ones
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0  # tokens in the kept sequences
    loss_tokens: int = 0
    cut_tokens: int = 0  # tokens removed from the truncated sequences
    longest: int = 0  # longest sequence before truncation
    truncated_indices: list[int] = dataclasses.field(default_factory=list)
    dropped_indices: list[int] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        """One line for logs."""
        return (f"{self.kept}/{self.examples} examples kept ({self.truncated} truncated, {self.cut_tokens} tokens cut; "
                f"{self.dropped} dropped: prompt too long), {self.tokens} tokens, {self.loss_tokens} loss tokens, "
                f"longest {self.longest}")

    def to_dict(self) -> dict:
        """Plain dict (for metrics / reports)."""
        return dataclasses.asdict(self)


def _eos_text(tokenizer) -> str:
    return tokenizer.eos_token if getattr(tokenizer, "eos_token", None) else VICUNA_SEP2


def _pieces(ex: Example, template: str, tokenizer) -> list[tuple[str, bool]]:
    return get_template(template).pieces(ex.instruction, ex.input, ex.output, ex.history, ex.system,
                                         _eos_text(tokenizer))


def prompt_text(ex: Example, template: str, eos: str = VICUNA_SEP2) -> str:
    """The inference prompt for an example under ``template`` (chat history and system kept by ``vicuna``)."""
    return get_template(template).prompt(ex.instruction, ex.input, ex.history, ex.system, eos)


def _special_ids(tokenizer) -> tuple[list[int], int]:
    if tokenizer.eos_token_id is None:
        raise ConfigError("tokenizer has no EOS token; SFT needs one to end every response")
    bos = [int(tokenizer.bos_token_id)] if tokenizer.bos_token_id is not None else []
    return bos, int(tokenizer.eos_token_id)


def _label_by_offsets(pieces: list[tuple[str, bool]], ids: list[int], offsets) -> list[int] | None:
    """Per-token 0/1 labels from character offsets, or None if a token straddles two pieces."""
    starts, ends, pos = [], [], 0
    for text, _ in pieces:
        starts.append(pos)
        pos += len(text)
        ends.append(pos)
    mask = []
    for s, e in offsets:
        # the last piece starting at or before s (empty pieces share their start with the next one)
        k = max(0, bisect.bisect_right(starts, s) - 1)
        if e > ends[k]:
            return None
        mask.append(int(pieces[k][1]))
    return mask if len(mask) == len(ids) else None


def _encode_separately(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    ids, mask = [], []
    for text, is_resp in pieces:
        if text:
            toks = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += toks
            mask += [int(is_resp)] * len(toks)
    return ids, mask


def _encode_many(tokenizer, all_pieces: Sequence[list[tuple[str, bool]]]) -> list[tuple[list[int], list[int]]]:
    """Token ids and 0/1 response labels of each example's text (no BOS/EOS yet)."""
    out = []
    fast = getattr(tokenizer, "is_fast", False)
    for lo in range(0, len(all_pieces), _BATCH):
        chunk = all_pieces[lo:lo + _BATCH]
        if fast:
            enc = tokenizer(["".join(t for t, _ in p) for p in chunk], add_special_tokens=False,
                            return_offsets_mapping=True)
            for p, ids, offs in zip(chunk, enc["input_ids"], enc["offset_mapping"]):
                mask = _label_by_offsets(p, ids, offs)
                out.append((list(ids), mask) if mask is not None else _encode_separately(tokenizer, p))
        else:
            out.extend(_encode_separately(tokenizer, p) for p in chunk)
    return out


def _finish(ids: list[int], mask: list[int], bos: list[int], eos: int | None, max_seq_len: int,
            min_response_tokens: int) -> tuple[np.ndarray | None, np.ndarray | None, str, int]:
    """Add BOS/EOS (``eos`` None: neither, the chat template wrote them) and apply the truncation policy:
    ``(ids, mask, status, full_length)``."""
    if eos is not None:
        ids = bos + ids + [eos]
        mask = [0] * len(bos) + mask + [1]
    n = len(ids)
    if n <= max_seq_len:
        return np.asarray(ids, np.int32), np.asarray(mask, np.int32), "kept", n
    first_response = mask.index(1)
    if first_response + min_response_tokens > max_seq_len:
        return None, None, "dropped", n
    return np.asarray(ids[:max_seq_len], np.int32), np.asarray(mask[:max_seq_len], np.int32), "truncated", n


def _encode_all(examples: Sequence[Example], tokenizer, template: str, chat_template: str | None):
    """``(encoded (ids, mask) per example, bos, eos)``; ``eos`` None for ``chat`` (the template writes it)."""
    if template == "chat":
        jinja = resolve_chat_template(tokenizer, chat_template)
        return ([encode_chat(tokenizer, example_messages(ex), jinja, f"example {i}") for i, ex in enumerate(examples)],
                [], None)
    bos, eos = _special_ids(tokenizer)
    return _encode_many(tokenizer, [_pieces(ex, template, tokenizer) for ex in examples]), bos, eos


def tokenize_example(ex: Example, tokenizer, template: str, max_seq_len: int, min_response_tokens: int = 1,
                     chat_template: str | None = None):
    """``(ids int32 [n], loss_mask int32 [n], status)``; status ``kept``/``truncated``/``dropped`` (ids None).

    ``chat_template`` (builtin name or Jinja file) is used by template ``chat`` when the tokenizer has none."""
    [(ids, mask)], bos, eos = _encode_all([ex], tokenizer, template, chat_template)
    ids, mask, status, _ = _finish(ids, mask, bos, eos, max_seq_len, min_response_tokens)
    return ids, mask, status


def tokenize_dataset(examples: Sequence[Example], tokenizer, template: str, max_seq_len: int,
                     min_response_tokens: int = 1, chat_template: str | None = None,
                     ) -> tuple[list[tuple[np.ndarray, np.ndarray]], TokenizeStats]:
    """Tokenize all examples under the truncation policy; returns ``(list of (ids, loss_mask), stats)``.

    Template ``chat`` renders with the tokenizer's chat template, else ``chat_template`` (see
    :mod:`teams_rl_jax.data.chat_sft`).

    Raises ConfigError for multi-turn examples under a template without chat turns (``alpaca``).
    """
    if max_seq_len < 2 or min_response_tokens < 1:
        raise ConfigError(f"need max_seq_len >= 2 and min_response_tokens >= 1, got {max_seq_len}, "
                          f"{min_response_tokens}")
    tmpl = get_template(template)
    if not tmpl.multi_turn:
        n_multi = sum(1 for ex in examples if ex.history)
        if n_multi:
            raise ConfigError(f"{n_multi} examples are multi-turn conversations but template {template!r} has "
                              f"no chat turns; use template 'vicuna'")
    encoded, bos, eos = _encode_all(examples, tokenizer, template, chat_template)
    stats = TokenizeStats(examples=len(examples))
    out = []
    for i, (ids, mask) in enumerate(encoded):
        ids, mask, status, full = _finish(ids, mask, bos, eos, max_seq_len, min_response_tokens)
        stats.longest = max(stats.longest, full)
        if status == "dropped":
            stats.dropped += 1
            stats.dropped_indices.append(i)
            continue
        if status == "truncated":
            stats.truncated += 1
            stats.truncated_indices.append(i)
            stats.cut_tokens += full - max_seq_len
        stats.kept += 1
        stats.tokens += len(ids)
        stats.loss_tokens += int(mask.sum())
        out.append((ids, mask))
    return out, stats
