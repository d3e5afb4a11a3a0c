"""Tokenizers: load a local Hugging Face tokenizer dir, or build a small offline word-level one.

No hub: ``load_tokenizer`` reads a local directory only. ``build_word_tokenizer`` makes a tokenizer
from text (``tokenizers`` WordLevel with punctuation splitting) for the offline default pipeline and
tests, where the models are tiny and random; it saves like any HF tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from teams_rl_jax.errors import CheckpointError

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3: pad, bos, eos, unk


def load_tokenizer(path: str | Path):
    """``AutoTokenizer.from_pretrained(path)`` for a local dir; errors name the path."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"tokenizer dir does not exist: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types; report one line
        raise CheckpointError(f"{path}: cannot load tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token or tok.eos_token  # Llama tokenizers ship without a pad token
    return tok


def build_word_tokenizer(texts: Iterable[str], vocab_size: int = 4096, save_dir: str | Path | None = None):
    """A word-level ``PreTrainedTokenizerFast`` trained on ``texts`` (pad=0, bos=1, eos=2, unk=3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS))
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast
