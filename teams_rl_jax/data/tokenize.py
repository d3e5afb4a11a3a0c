"""Example -> token ids + response-only loss mask, with a stated truncation policy.

Layout of one sequence: ``[BOS] prompt response [EOS]``; ``loss_mask`` is 1 on response tokens and on
EOS (the model must learn to stop), 0 on BOS and the prompt.

Truncation policy for sequences longer than ``max_seq_len``:
* the response is cut at the end (then no EOS: the model should not learn to stop mid-answer);
* if the prompt leaves fewer than ``min_response_tokens`` response tokens, the example is dropped
  (training on a prompt with no answer teaches nothing).
Both are counted in :class:`TokenizeStats` and reported by the SFT stage.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from teams_rl_jax.data.readers import Example
from teams_rl_jax.data.templates import format_alpaca, format_prompt, format_vicuna


@dataclasses.dataclass
class TokenizeStats:
    """Counts over a dataset: examples kept / truncated / dropped, tokens, response (loss) tokens."""

    examples: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    loss_tokens: int = 0

    def summary(self) -> str:
        """One line for logs."""
        return (f"{self.kept}/{self.examples} examples kept ({self.truncated} truncated, {self.dropped} dropped: "
                f"prompt too long), {self.tokens} tokens, {self.loss_tokens} loss tokens")


def prompt_text(ex: Example, template: str) -> str:
    """The prompt for an example under ``template`` (chat history is kept by ``vicuna`` only)."""
    if template == "vicuna":
        return format_vicuna(ex.instruction, ex.input, list(ex.history))
    if template == "alpaca":
        return format_alpaca(ex.instruction, ex.input)
    return format_prompt(template, ex.instruction, ex.input)


def tokenize_example(ex: Example, tokenizer, template: str, max_seq_len: int, min_response_tokens: int = 1):
    """``(ids int32 [n], loss_mask int32 [n], status)`` with status ``kept``/``truncated``/``dropped``."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt = bos + tokenizer(prompt_text(ex, template), add_special_tokens=False)["input_ids"]
    # Vicuna answers follow "ASSISTANT:" after a space; Alpaca's follow "### Response:\n" directly.
    response_text = (" " if template == "vicuna" else "") + ex.output
    response = tokenizer(response_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    status = "kept"
    if len(prompt) + min_response_tokens > max_seq_len:
        return None, None, "dropped"
    if len(prompt) + len(response) > max_seq_len:
        response = response[: max_seq_len - len(prompt)]
        status = "truncated"
    ids = np.asarray(prompt + response, np.int32)
    mask = np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(response), np.int32)])
    return ids, mask, status


def tokenize_dataset(examples, tokenizer, template: str, max_seq_len: int, min_response_tokens: int = 1):
    """Tokenize all examples; returns ``(list of (ids, loss_mask), TokenizeStats)``."""
    stats = TokenizeStats(examples=len(examples))
    out = []
    for ex in examples:
        ids, mask, status = tokenize_example(ex, tokenizer, template, max_seq_len, min_response_tokens)
        if status == "dropped":
            stats.dropped += 1
            continue
        stats.truncated += status == "truncated"
        stats.kept += 1
        stats.tokens += len(ids)
        stats.loss_tokens += int(mask.sum())
        out.append((ids, mask))
    return out, stats
