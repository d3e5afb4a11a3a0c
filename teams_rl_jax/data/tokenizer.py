"""Tokenizers: load a local Hugging Face tokenizer dir, or build a small offline word-level one.

No hub: ``load_tokenizer`` reads a local directory only. ``build_word_tokenizer`` makes a tokenizer
from text (``tokenizers`` WordLevel with punctuation splitting) for the offline default pipeline and
tests, where the models are tiny and random; it saves like any HF tokenizer.

Special ids, the same everywhere (env, operator, judge, backends, SFT):

* :func:`eos_token_ids` - every id that ends a generation: the tokenizer's EOS plus the checkpoint's
  ``eos_token_id`` lists (config.json, generation_config.json; Llama-3-Instruct lists
  ``<|eot_id|>`` and ``<|end_of_text|>``).
* :func:`choose_pad_id` - the pad id is never an EOS id. Pad fills masked positions only, so any
  non-EOS id is correct; but a pad equal to EOS makes "stop at EOS or pad" logic cut generations at
  padding, and "mask where id == pad" logic drop the EOS target from the SFT loss, and id 0 is a real
  token in byte-level vocabularies ("!" in Llama-3). Order: the tokenizer's own pad if it is not EOS,
  its unk, a special token named like a pad / reserved token, then BOS (never a content token).
* :func:`tokenizer_fingerprint` / :func:`same_tokenizer` - whether two tokenizers map text to the
  same ids (vocabulary, merges, normalizer, pre-tokenizer, added tokens), so id buffers of one can
  be fed to a model of the other.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence

from teams_rl_jax.errors import CheckpointError, ConfigError

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
    try:
        pad = choose_pad_id(tok, eos_token_ids(tok, checkpoint=path))
    except ConfigError:  # no EOS or no candidate (not a generative tokenizer): leave it as it is
        return tok
    if tok.pad_token_id != pad:  # Llama tokenizers ship without a pad token; some set pad = eos
        tok.pad_token = tok.convert_ids_to_tokens(pad)
    return tok


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def eos_token_ids(tokenizer, lm_config=None, checkpoint: str | Path | None = None) -> tuple[int, ...]:
    """Every id that ends a generation: the tokenizer's EOS, then ``lm_config.eos_token_id`` and the
    ``eos_token_id`` of ``checkpoint``'s config.json / generation_config.json (a list or an int).

    ``checkpoint`` defaults to the tokenizer's directory (``name_or_path``) when that is a local dir.
    """
    ids: list[int] = []
    for v in [getattr(tokenizer, "eos_token_id", None), getattr(lm_config, "eos_token_id", None)]:
        ids += _ids(v)
    ckpt = checkpoint if checkpoint is not None else getattr(tokenizer, "name_or_path", None)
    if ckpt and Path(ckpt).is_dir():
        for name in ("config.json", "generation_config.json"):
            f = Path(ckpt) / name
            if f.is_file():
                try:
                    ids += _ids(json.loads(f.read_text()).get("eos_token_id"))
                except (ValueError, OSError, TypeError):
                    pass  # a broken optional file is not fatal: the tokenizer's EOS still applies
    out = tuple(dict.fromkeys(ids))
    if not out:
        raise ConfigError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no EOS token "
                          "(set eos_token in tokenizer_config.json or eos_token_id in generation_config.json)")
    return out


_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<|reserved_special_token_0|>",
              "<|endoftext|>", "<|fim_pad|>")


def choose_pad_id(tokenizer, eos_ids: Sequence[int] | None = None) -> int:
    """A pad id that is not an EOS id (see the module docstring for the order tried)."""
    eos = set(eos_ids if eos_ids is not None else _ids(getattr(tokenizer, "eos_token_id", None)))
    vocab = tokenizer.get_vocab()
    candidates = [getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "unk_token_id", None)]
    candidates += [vocab.get(name) for name in _PAD_NAMES]
    candidates += [getattr(tokenizer, "bos_token_id", None)]
    for c in candidates:
        if c is not None and int(c) not in eos:
            return int(c)
    raise ConfigError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r}: no pad candidate that is not an "
                      f"EOS id {sorted(eos)} (add a pad token to the tokenizer)")


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides ``text -> ids``: model (vocab, merges), normalizer, pre-tokenizer, added tokens.

    Decoder, post-processor (BOS insertion), padding and truncation settings are left out: they do not
    change the ids of a text encoded without special tokens. Slow (Python) tokenizers hash their vocab.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        keep = {k: spec.get(k) for k in ("model", "normalizer", "pre_tokenizer", "added_tokens")}
    else:
        keep = {"class": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items())}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def same_tokenizer(a, b) -> bool:
    """Whether ``a`` and ``b`` give the same ids for any text (same object, or same fingerprint)."""
    return a is b or tokenizer_fingerprint(a) == tokenizer_fingerprint(b)


def check_same_tokenizer(a, b, what: str) -> None:
    """Raise a one-line ConfigError when ``a`` and ``b`` differ (``what`` names the two roles)."""
    if not same_tokenizer(a, b):
        na, nb = getattr(a, "name_or_path", "?") or "?", getattr(b, "name_or_path", "?") or "?"
        raise ConfigError(f"{what}: tokenizers differ ({na!r} vs {nb!r}: vocabulary, merges or normalizer); token "
                          "ids of one are not ids of the other, so the jitted env cannot pass buffers between "
                          "them: use the same tokenizer, or the host (text) env path with HTTP/text backends")


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


def front_special_ids(tokenizer) -> tuple[int, ...]:
    """The ids ``tokenizer(text)`` (``add_special_tokens=True``, the default) puts *before* the text's own
    tokens: ``(bos,)`` for Llama (``add_bos_token`` / a ``<s> $A`` post-processor), ``()`` for Qwen2 or
    a tokenizer without a post-processor. Found by encoding a probe text both ways (trailing specials,
    e.g. an EOS some tokenizers append, are not front specials)."""
    probe = "Hello"
    try:
        with_sp = [int(i) for i in tokenizer(probe)["input_ids"]]
        bare = [int(i) for i in tokenizer(probe, add_special_tokens=False)["input_ids"]]
    except (TypeError, ValueError, KeyError):  # a tokenizer that cannot encode the probe: fall back to its add_bos_token flag
        bos = getattr(tokenizer, "bos_token_id", None)
        return (int(bos),) if bos is not None and getattr(tokenizer, "add_bos_token", False) else ()
    if not bare:  # probe encodes to nothing: only a leading BOS can be told apart from trailing specials
        bos = getattr(tokenizer, "bos_token_id", None)
        return (bos,) if with_sp[:1] == [bos] else ()
    for k in range(len(with_sp) - len(bare) + 1):
        if with_sp[k:k + len(bare)] == bare:
            return tuple(with_sp[:k])
    return ()
