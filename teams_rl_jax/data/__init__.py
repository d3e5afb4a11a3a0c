"""Instruction data: templates, readers/writers, tokenization with response-only loss, packing, batches.

``read_dataset`` -> ``tokenize_dataset`` -> ``BatchIterator`` (packed rows with segment ids) is the
SFT input path; ``templates`` also serves the env's reviewer/instructor prompts.
"""

from teams_rl_jax.data.packing import pack_rows, segment_attention_mask, unpacked_rows
from teams_rl_jax.data.pipeline import BatchIterator
from teams_rl_jax.data.readers import Example, read_dataset, write_jsonl
from teams_rl_jax.data.templates import format_alpaca, format_prompt, format_vicuna
from teams_rl_jax.data.tokenize import TokenizeStats, tokenize_dataset, tokenize_example

__all__ = ["BatchIterator", "Example", "TokenizeStats", "format_alpaca", "format_prompt", "format_vicuna",
           "pack_rows", "read_dataset", "segment_attention_mask", "tokenize_dataset", "tokenize_example",
           "unpacked_rows", "write_jsonl"]
