"""Instruction data: templates, readers/writers, tokenization with response-only loss, packing, batches.

``read_dataset`` -> ``tokenize_dataset`` -> ``BatchIterator`` (packed rows with segment ids) is the
SFT input path (``make_batch_iterator`` does all three from a ``DataConfig``); ``templates`` also
serves the env's reviewer/instructor prompts; ``tfds_io`` (the tfds extra) writes/reads TFDS datasets.
"""

from teams_rl_jax.data.config import DataConfig
from teams_rl_jax.data.packing import (empty_rows, fill_ratio, first_fit, pack_rows, segment_attention_mask,
                                       unpacked_rows)
from teams_rl_jax.data.pipeline import BatchIterator, make_batch_iterator
from teams_rl_jax.data.readers import (Example, example_to_record, read_alpaca_json, read_dataset, read_jsonl,
                                       read_sharegpt, write_jsonl)
from teams_rl_jax.data.templates import format_alpaca, format_prompt, format_vicuna, get_template
from teams_rl_jax.data.tokenize import TokenizeStats, prompt_text, tokenize_dataset, tokenize_example

__all__ = ["BatchIterator", "DataConfig", "Example", "TokenizeStats", "empty_rows", "example_to_record",
           "fill_ratio", "first_fit", "format_alpaca", "format_prompt", "format_vicuna", "get_template",
           "make_batch_iterator", "pack_rows", "prompt_text", "read_alpaca_json", "read_dataset", "read_jsonl",
           "read_sharegpt", "segment_attention_mask", "tokenize_dataset", "tokenize_example", "unpacked_rows",
           "write_jsonl"]
