"""Dataset and query-efficiency statistics of one generated dataset (the paper's diversity/complexity/cost evidence).

:func:`dataset_stats` returns a JSON-able dict (deterministic: sorted keys, seeded sampling, rounded floats):

* ``size``; instruction / input / answer lengths in words (mean, quantiles, fixed-bin histogram);
* ``distinct_1/2/3`` of instructions and of answers: distinct n-grams / all n-grams over the whole
  set (Li et al. 2016), lower-cased word tokens;
* ``embedding_diversity``: mean pairwise cosine distance ``1 - cos`` of the instructions' MiniLM
  (all-MiniLM-L6-v2) embeddings over a seeded sample of ``diversity_max`` records; ``sum_i<j cos`` is
  computed as ``(|sum e|^2 - n) / 2`` of the unit-norm embeddings (O(n d), no n x n matrix);
* ``complexity``: the env's own measures: per instruction, how many clauses of each operation's
  phrase bank (``env.phrases.BANKS``: constraints, depth requests, reasoning steps, input blocks,
  breadth frames) and how many concretized terms (``CONCRETE_TERMS`` replacements) it holds, plus
  surface cues that LLM rewrites leave (constraint words like "must"/"at least", step markers like
  "step"/"first"/numbered items), sentences and words;
* ``ops``: the operation histogram of the kept records' op chains (``meta.ops``), and the histogram of
  every operation selected (``summary.json``'s ``op_histogram``) when present;
* ``eliminations`` by rule, ``duplicates``, ``queries`` by role, ``queries_total`` and
  ``queries_per_kept`` from the generate stage's ``summary.json`` (else summed from ``meta.queries``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from teams_rl_jax.env import phrases as P
from teams_rl_jax.env.operations import OPERATIONS
from teams_rl_jax.errors import DataError

WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?", re.UNICODE)
LENGTH_BINS = (0, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 10**9)
CONSTRAINT_CUES = ("must", "should", "at least", "at most", "no more than", "fewer than", "exactly", "without",
                   "only", "avoid", "do not", "don't", "limit", "include", "within", "under", "each")
STEP_CUES = ("step", "first", "then", "next", "finally", "before", "after that", "stage")
_NUMBERED = re.compile(r"(?m)^\s*(?:\d+[.)]|[-*])\s+")
_SENTENCE = re.compile(r"[.!?]+(?:\s|$)")


def read_records(path: str | Path) -> list[dict]:
    """Alpaca JSONL records (with optional ``meta``); DataError names ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    out = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("instruction"), str):
                raise DataError(f"{path}:{i}: expected an object with a string 'instruction'")
            for k in ("input", "output"):
                if rec.get(k) is not None and not isinstance(rec[k], str):
                    raise DataError(f"{path}:{i}: '{k}' must be a string")
            out.append(rec)
    if not out:
        raise DataError(f"{path}: dataset is empty (no records)")
    return out


def words(text: str) -> list[str]:
    """Lower-cased word tokens."""
    return WORD.findall(text.lower())


def _r(x: float, nd: int = 6) -> float:
    return float(round(float(x), nd))


def length_stats(lengths: Sequence[int]) -> dict:
    """Mean, quantiles and fixed-bin histogram (comparable across datasets)."""
    a = np.asarray(lengths, np.float64)
    hist, _ = np.histogram(a, bins=np.asarray(LENGTH_BINS, np.float64))
    q = np.quantile(a, [0.1, 0.5, 0.9]) if len(a) else np.zeros(3)
    return {"mean": _r(a.mean() if len(a) else 0), "p10": _r(q[0]), "median": _r(q[1]), "p90": _r(q[2]),
            "max": int(a.max()) if len(a) else 0, "hist": [int(h) for h in hist], "bins": list(LENGTH_BINS[:-1])}


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / total n-grams over all texts (0 when there are none)."""
    total, seen = 0, set()
    for t in texts:
        w = words(t)
        grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return _r(len(seen) / total) if total else 0.0


def mean_pairwise_cosine_distance(emb: np.ndarray) -> tuple[float, np.ndarray]:
    """``(mean over i<j of 1 - cos, per-record mean distance to the others)`` of unit-norm rows."""
    emb = np.asarray(emb, np.float64)
    n = len(emb)
    if n < 2:
        return 0.0, np.zeros(n)
    s = emb.sum(0)
    mean_cos = (s @ s - n) / (n * (n - 1))  # sum_{i != j} cos / (n (n-1)); the diagonal is 1
    per = 1.0 - (emb @ s - 1.0) / (n - 1)
    return float(1.0 - mean_cos), per


def _count_phrases(text: str, phrases: Sequence[str]) -> int:
    low = text.lower()
    return sum(low.count(p.lower()) for p in phrases)


def complexity(instruction: str) -> dict:
    """The env's complexity measures for one instruction (see the module docstring)."""
    low = instruction.lower()
    w = words(instruction)
    concrete = [r for reps in P.CONCRETE_TERMS.values() for r in reps]
    out = {f"bank_{op}": _count_phrases(instruction, bank) for op, bank in sorted(P.BANKS.items())}
    out["concretized_terms"] = _count_phrases(instruction, concrete)
    out["constraint_cues"] = sum(len(re.findall(r"\b" + re.escape(c) + r"\b", low)) for c in CONSTRAINT_CUES)
    out["step_cues"] = sum(len(re.findall(r"\b" + re.escape(c) + r"s?\b", low)) for c in STEP_CUES) + \
        len(_NUMBERED.findall(instruction))
    out["sentences"] = max(1, len(_SENTENCE.findall(instruction.strip()))) if w else 0
    out["words"] = len(w)
    return out


def _op_name(op: Any) -> str:
    if isinstance(op, int) and 0 <= op < len(OPERATIONS):
        return OPERATIONS[op]
    return str(op)


def _embed(texts: list[str], encoder) -> np.ndarray:
    return np.asarray(encoder.encode(texts, max_length=128, batch_size=64), np.float64)


def dataset_stats(records: list[dict] | str | Path, *, summary: dict | str | Path | None = None, encoder=None,
                  diversity_max: int = 512, seed: int = 0, name: str = "dataset") -> dict:
    """Statistics of one dataset (see the module docstring). ``encoder``: a loaded MiniLM
    (:func:`teams_rl_jax.models.encoder.load_encoder`) or None to skip the embedding diversity."""
    if not isinstance(records, list):
        records = read_records(records)
    if isinstance(summary, (str, Path)):
        summary = json.loads(Path(summary).read_text()) if Path(summary).is_file() else None
    instr = [r["instruction"] for r in records]
    inputs = [r.get("input") or "" for r in records]
    answers = [r.get("output") or "" for r in records]
    full = [f"{a}\n{b}".strip() for a, b in zip(instr, inputs)]
    out: dict[str, Any] = {"name": name, "size": len(records)}
    out["lengths"] = {"instruction": length_stats([len(words(t)) for t in full]),
                      "answer": length_stats([len(words(t)) for t in answers])}
    out["distinct"] = {kind: {f"distinct_{n}": distinct_n(texts, n) for n in (1, 2, 3)}
                       for kind, texts in (("instruction", full), ("answer", answers))}

    # complexity: per-measure means, and the per-record total of the env's constraint/step measures
    comp = [complexity(t) for t in full]
    keys = sorted(comp[0])
    out["complexity"] = {k: _r(np.mean([c[k] for c in comp])) for k in keys}
    totals = [c["bank_add_constraints"] + c["bank_increase_reasoning_steps"] + c["bank_deepening"]
              + c["bank_complicate_input"] + c["concretized_terms"] + c["constraint_cues"] + c["step_cues"]
              for c in comp]
    out["complexity"]["total"] = _r(np.mean(totals))
    out["complexity"]["hist"] = [int(x) for x in np.bincount(np.minimum(totals, 20), minlength=21)]

    if encoder is not None:
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(len(full), size=min(diversity_max, len(full)), replace=False))
        mean_d, per = mean_pairwise_cosine_distance(_embed([full[i] for i in idx], encoder))
        hist, _ = np.histogram(per, bins=np.linspace(0.0, 1.2, 25))
        out["embedding_diversity"] = {"mean_pairwise_cosine_distance": _r(mean_d), "sample": int(len(idx)),
                                      "per_record_hist": [int(h) for h in hist], "bin_width": 0.05}

    ops: dict[str, int] = {}
    chain_lengths = []
    queries_meta: dict[str, float] = {}
    for r in records:
        meta = r.get("meta") or {}
        chain = meta.get("ops") or []
        chain_lengths.append(len(chain))
        for op in chain:
            ops[_op_name(op)] = ops.get(_op_name(op), 0) + 1
        for role, q in (meta.get("queries") or {}).items():
            queries_meta[role] = queries_meta.get(role, 0) + float(q)
    out["ops"] = {"kept_records": dict(sorted(ops.items())), "mean_chain_length": _r(np.mean(chain_lengths))}
    if summary:
        if summary.get("op_histogram"):
            out["ops"]["selected"] = {str(k): int(v) for k, v in sorted(summary["op_histogram"].items())}
        out["eliminations"] = {str(k): int(v) for k, v in sorted((summary.get("eliminated") or {}).items())}
        out["duplicates"] = {str(k): int(v) for k, v in sorted((summary.get("duplicates") or {}).items())}
        queries = {str(k): int(v) for k, v in sorted((summary.get("queries") or {}).items())}
        out["kept"] = int(summary.get("kept", len(records)))
        out["queries_source"] = "summary.json"
        for k in ("paid", "replayed"):
            if isinstance(summary.get(k), dict):
                out[k] = {str(r): int(v) for r, v in sorted(summary[k].items())}
    else:
        # meta.queries is what a seed had cost when each record was made: a seed's last record holds
        # its total, so summing over records over-counts chains; used only without a summary.
        queries = {k: int(v) for k, v in sorted(queries_meta.items())}
        out["kept"] = len(records)
        out["queries_source"] = "meta (no summary.json; upper bound)"
    out["queries"] = queries
    total = sum(queries.values())
    out["queries_total"] = int(total)
    out["queries_per_kept"] = _r(total / out["kept"]) if out["kept"] else None
    return out
