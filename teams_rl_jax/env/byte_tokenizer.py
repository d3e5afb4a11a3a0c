"""The env's lossless text encoding for HTTP roles: a byte-level BPE trained on the env's own words.

With every LLM role behind HTTP there is no local tokenizer of the served model, and the env's
buffers must still hold any text the instructor writes. ``byte_level_tokenizer`` builds a GPT-2
style byte-level BPE (no hub) whose merges are learned from the seeds and the env's phrase banks:
the env's own words are one token each (so the hashed observation and the buffer rules see words),
and any other text falls back to smaller pieces down to single bytes, so
``decode(encode(t)) == t`` for every string (no ``<unk>``). Lengths in the served model's tokens
come from the endpoint's ``usage``, not from this encoding (``Instruction.served``).
"""

from __future__ import annotations

from typing import Sequence

from teams_rl_jax.env.seeds import tokenizer_corpus

SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2


def byte_level_tokenizer(texts: Sequence[str], vocab_size: int = 8192):
    """A lossless byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` + the env's phrases."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=max(vocab_size, 256 + len(SPECIALS)), special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   clean_up_tokenization_spaces=False)
