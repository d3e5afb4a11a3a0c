"""Seed instructions in the env: the :class:`SeedBatch` pytree, building it from text, the offline
tokenizer, and decoding token buffers back into text (the seeds are read by :mod:`teams_rl_jax.data.seeds`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import flax.struct as struct
import jax
import jax.numpy as jnp
import numpy as np

from teams_rl_jax.data.seeds import read_seeds
from teams_rl_jax.data.tokenizer import build_word_tokenizer
from teams_rl_jax.env import phrases
from teams_rl_jax.env.buffers import encode, pad_rows
from teams_rl_jax.errors import DataError


@struct.dataclass
class SeedBatch:
    """``N`` seed instructions: ``tokens int32 [N, L]`` right-padded, ``lengths int32 [N]``, and
    ``domains int32 [N]`` (-1 = unknown; breadth picks its new seed from the same domain)."""

    tokens: jax.Array
    lengths: jax.Array
    domains: jax.Array

    @property
    def num(self) -> int:
        """Number of seeds ``N``."""
        return int(self.tokens.shape[0])


def read_seed_records(path: str | Path | None = None, field: str = "instruction",
                      limit: int | None = None) -> tuple[list[str], list[str | None]]:
    """``(texts, domains)`` of the seeds :func:`teams_rl_jax.data.seeds.read_seeds` reads (``path=None``:
    the bundled seeds). A seed's text is its instruction alone, as the generate stage's instructor sees
    it (Alpaca's ``input`` stays a separate field, as in the TeaMs-RL reference). Errors name ``file:line``.
    """
    seeds = read_seeds(path, limit, field=field)
    return [s.instruction for s in seeds], [s.domain for s in seeds]


def domain_ids(domains: Sequence[str | None]) -> np.ndarray:
    """``int32 [N]`` ids of domain names (sorted order), -1 for ``None``."""
    names = sorted({d for d in domains if d is not None})
    index = {d: i for i, d in enumerate(names)}
    return np.asarray([index[d] if d is not None else -1 for d in domains], np.int32)


def seeds_from_texts(texts: Sequence[str], tokenizer, max_len: int, domains: Sequence[str | None] | None = None,
                     on_long: Literal["error", "skip", "truncate"] = "error") -> SeedBatch:
    """Tokenize ``texts`` (no special tokens) into a :class:`SeedBatch` of width ``max_len``.

    Seeds longer than ``max_len`` tokens raise DataError (``on_long="error"``), are dropped
    (``"skip"``) or cut (``"truncate"``). ``domains`` (names, optional) enable same-domain breadth.
    """
    domains = list(domains) if domains is not None else [None] * len(texts)
    if len(domains) != len(texts):
        raise DataError(f"seeds: {len(texts)} texts but {len(domains)} domains")
    rows, kept = [], []
    for i, t in enumerate(texts):
        ids = encode(tokenizer, t)
        if not ids:
            raise DataError(f"seeds[{i}]: tokenizes to nothing: {t!r}")
        if len(ids) > max_len:
            if on_long == "error":
                raise DataError(f"seeds[{i}]: {len(ids)} tokens > max_len {max_len} (use on_long='skip' or 'truncate')")
            if on_long == "skip":
                continue
        rows.append(ids)
        kept.append(i)
    if not rows:
        raise DataError(f"seeds: none of {len(texts)} seeds fits in max_len {max_len}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    buf, lens = pad_rows(rows, max_len, pad)
    dom = domain_ids([domains[i] for i in kept])
    return SeedBatch(tokens=jnp.asarray(buf), lengths=jnp.asarray(lens), domains=jnp.asarray(dom))


def tokenizer_corpus(texts: Sequence[str]) -> list[str]:
    """``texts`` plus every phrase the env itself uses (banks, concrete terms, template phrases, stop
    words, punctuation): what the env's own tokenizers are built from."""
    corpus = list(texts)
    for bank in phrases.BANKS.values():
        corpus += list(bank)
    for generic, specifics in phrases.CONCRETE_TERMS.items():
        corpus += [generic, *specifics]
    corpus += list(phrases.TEMPLATE_PHRASES) + [p.title() for p in phrases.TEMPLATE_PHRASES]
    words = sorted(phrases.STOPWORDS)
    corpus += [" ".join(words), " ".join(w.title() for w in words), phrases.SORRY_WORD, phrases.SORRY_WORD.title(),
               " ".join("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")]  # every ASCII punctuation mark
    return corpus


def offline_tokenizer(texts: Sequence[str], vocab_size: int = 8192):
    """Word-level tokenizer (no hub) covering ``texts`` plus every phrase the env itself uses."""
    return build_word_tokenizer(tokenizer_corpus(texts), vocab_size=vocab_size)


def decode(tokenizer, tokens, lengths) -> str | list[str]:
    """Text of a token buffer: ``[L]`` + scalar length -> str; ``[N, L]`` + ``[N]`` -> list of str."""
    tokens = np.asarray(tokens)
    lengths = np.asarray(lengths)
    if tokens.ndim == 1:
        return tokenizer.decode(tokens[: int(lengths)].tolist(), skip_special_tokens=True)
    flat = tokens.reshape(-1, tokens.shape[-1])
    lens = lengths.reshape(-1)
    out = [tokenizer.decode(row[: int(n)].tolist(), skip_special_tokens=True) for row, n in zip(flat, lens)]
    if tokens.ndim == 2:
        return out
    return np.asarray(out, dtype=object).reshape(tokens.shape[:-1]).tolist()
