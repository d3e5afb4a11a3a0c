"""The generate stage's filters: WizardLM's four elimination rules and duplicate removal.

Rules 1 (``no_gain``: the reviewer said "Equal", or the same words) and 4 (``template_copy``) judge the
evolved *instruction*; rules 2 (``sorry_short``) and 3 (``stopwords_only``) judge the expert's
*answer*, as WizardLM does (the env, which has no answer, applies them to the instruction as a
proxy). A rewrite cut by ``max_new_tokens`` is eliminated as ``truncated``. The text checks are
``env.elimination``'s, so the env and this stage share one definition of each rule.

Duplicates: exact (case- and whitespace-insensitive) and near (MiniLM cosine >= threshold) against
every instruction already kept, including earlier ones of the same batch.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from teams_rl_jax.env import elimination as E
from teams_rl_jax.models.encoder import load_encoder

INSTRUCTION_RULES = ("no_gain", "template_copy")
ANSWER_RULES = ("sorry_short", "stopwords_only")
RULES = ("no_gain", "sorry_short", "stopwords_only", "template_copy", "truncated")


def instruction_flags(old: str, new: str, judge_equal: bool | None, truncated: bool) -> dict[str, bool]:
    """Rules on the evolved instruction: 1 (no gain), 4 (template copy) and the length cut."""
    return {"no_gain": E.text_no_gain(old, new, judge_equal=judge_equal),
            "template_copy": E.text_template_copy(old, new), "truncated": bool(truncated)}


def answer_flags(answer: str) -> dict[str, bool]:
    """Rules 2-3 on the expert's answer (WizardLM's response filters)."""
    return {"sorry_short": E.text_sorry_short("", answer), "stopwords_only": E.text_stopwords_only("", answer)}


def normalize(text: str) -> str:
    """Exact-duplicate key: lower case, whitespace collapsed."""
    return re.sub(r"\s+", " ", text.strip().lower())


class Deduper:
    """Exact and near-duplicate check against everything kept so far (``add`` what you keep)."""

    def __init__(self, threshold: float | None, encoder_path: str | None = None):
        self.threshold = threshold
        self.keys: set[str] = set()
        self.encoder = None
        self.emb = np.zeros((0, 1), np.float32)
        if threshold is not None:
            self.encoder = load_encoder(encoder_path)
            self.emb = np.zeros((0, self.encoder.dim), np.float32)

    def embed(self, texts: Sequence[str], rows: int = 64, length: int = 128) -> np.ndarray:
        """MiniLM embeddings ``[N, D]``; every chunk is padded to one shape (``rows`` x ``length``
        tokens), so the encoder compiles once per run instead of once per (rows, length) bucket."""
        if self.encoder is None or not texts:
            return np.zeros((len(texts), self.emb.shape[1]), np.float32)
        enc = self.encoder
        length = min(length, enc.config.max_position_embeddings)
        out = np.zeros((len(texts), enc.dim), np.float32)
        for start in range(0, len(texts), rows):
            chunk = list(texts[start:start + rows])
            ids = enc.tokenizer(chunk, truncation=True, max_length=length, padding=False)["input_ids"]
            input_ids = np.full((rows, length), enc.config.pad_token_id, np.int32)
            mask = np.zeros((rows, length), np.int32)
            for r, x in enumerate(ids):
                input_ids[r, :len(x)] = x
                mask[r, :len(x)] = 1
            mask[len(ids):, 0] = 1  # filler rows: one pad token, discarded
            out[start:start + len(ids)] = np.asarray(enc._embed_jit(enc.params, input_ids, mask))[:len(ids)]
        return out

    def add(self, texts: Sequence[str], emb: np.ndarray | None = None) -> None:
        """Mark ``texts`` as kept."""
        self.keys.update(normalize(t) for t in texts)
        if self.encoder is not None and len(texts):
            e = self.embed(texts) if emb is None else emb
            self.emb = np.concatenate([self.emb, e.astype(np.float32)], 0)

    def filter(self, texts: Sequence[str]) -> list[str | None]:
        """Per text: ``"exact"``, ``"near"`` or None (new); the new ones are added, in order."""
        emb = self.embed(texts)
        out: list[str | None] = []
        for i, t in enumerate(texts):
            if normalize(t) in self.keys:
                out.append("exact")
                continue
            if self.encoder is not None and self.emb.shape[0] and float(np.max(self.emb @ emb[i])) >= self.threshold:
                out.append("near")
                continue
            out.append(None)
            self.add([t], emb[i:i + 1] if self.encoder is not None else None)
        return out
