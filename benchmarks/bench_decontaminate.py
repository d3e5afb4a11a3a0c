"""Decontamination speed and memory: synthetic Alpaca records vs a synthetic MMLU-sized benchmark.

    python benchmarks/bench_decontaminate.py                    # 25K records vs 14,042 MMLU questions
    python benchmarks/bench_decontaminate.py --records 250000

The benchmark is written in the MMLU layout (``mmlu.jsonl``: questions of 10-60 words, longest set by
``--question-words``, 4 choices of 1-12 words; ``eval.tasks`` reads it); the records have instructions
of 20-40 words and outputs of 150-350 words, drawn from a 50K-word Zipf vocabulary. 1 record in 1000
carries a pasted benchmark question in its output (the planted hits the scan must find: checked).
Times the index build (reading + hashing the benchmark) and the scan separately, single process, and
prints the peak RSS (``resource.getrusage``: the process's maximum, records in memory included) and
the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from teams_rl_jax.eval.decontaminate import build_index, contaminated, scan  # noqa: E402

MMLU_TEST = 14042


def _words(rng: np.random.Generator, vocab: np.ndarray, lo: int, hi: int) -> str:
    return " ".join(vocab[rng.zipf(1.2, int(rng.integers(lo, hi + 1))) % len(vocab)])


def write_benchmark(path: Path, rng: np.random.Generator, vocab: np.ndarray, n: int, longest: int) -> list[str]:
    questions = []
    with open(path / "mmlu.jsonl", "w") as f:
        for _ in range(n):
            q = _words(rng, vocab, 10, longest).capitalize() + "?"
            questions.append(q)
            f.write(json.dumps({"question": q, "choices": [_words(rng, vocab, 1, 12) for _ in range(4)],
                                "answer": int(rng.integers(4)), "subject": "synthetic"}) + "\n")
    return questions


def make_records(rng: np.random.Generator, vocab: np.ndarray, n: int, questions: list[str]) -> tuple[list, set]:
    recs, planted = [], set()
    for i in range(n):
        out = _words(rng, vocab, 150, 350)
        if i % 1000 == 7 and len(questions[i % len(questions)].split()) >= 13:
            out += " " + questions[i % len(questions)]
            planted.add(i)
        recs.append({"instruction": _words(rng, vocab, 20, 40), "input": "", "output": out,
                     "meta": {"seed_id": str(i)}})
    return recs, planted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=25_000)
    ap.add_argument("--questions", type=int, default=MMLU_TEST)
    ap.add_argument("--n", type=int, default=13)
    ap.add_argument("--question-words", type=int, default=60, help="longest question (uniform from 10)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    vocab = np.array([f"w{i}" for i in range(50_000)])
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        questions = write_benchmark(Path(d), rng, vocab, args.questions, args.question_words)
        recs, planted = make_records(rng, vocab, args.records, questions)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        index = build_index(d, args.n)
        t1 = time.perf_counter()
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        hits = scan(recs, index)
        t2 = time.perf_counter()
    found = contaminated(hits)
    assert planted <= found, f"missed planted records: {sorted(planted - found)[:5]}"
    words = sum(len(r["instruction"].split()) + len(r["output"].split()) for r in recs)
    rss2 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"benchmark: {args.questions} questions, {len(index.table):,} distinct {args.n}-grams; "
          f"records: {len(recs):,} ({words / len(recs):.0f} words each)")
    print(f"index build {t1 - t0:.1f} s; scan {t2 - t1:.1f} s ({len(recs) / (t2 - t1):,.0f} records/s); "
          f"contaminated {len(found)} (planted {len(planted)})")
    print(f"peak RSS: {rss0:.0f} MiB with the records, {rss1:.0f} MiB after the index "
          f"(+{rss1 - rss0:.0f}), {rss2:.0f} MiB at the end; load average {load0:.2f} -> {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
