"""Benchmark contamination of a generated dataset: word n-gram overlap with the eval benchmarks (issue 20).

What matches (lm-eval's decontamination, ``lm_eval/decontamination/janitor.py``, re-implemented):

* normalisation: ASCII letters lowercased, ASCII punctuation (``string.punctuation``) deleted (not
  replaced: ``don't`` -> ``dont``, ``well-known`` -> ``wellknown``), then split on whitespace; the
  Janitor's ``normalize_string`` + ``word_ngrams``. Non-ASCII text is left as it is (as there);
* an n-gram is ``n`` consecutive normalised words (default 13, lm-eval's and GPT-3's ``n``);
* benchmark side: every task of :data:`teams_rl_jax.eval.tasks.TASKS` with files under the data dir,
  read with that module's readers; each doc's raw pieces (:attr:`~teams_rl_jax.eval.tasks.Doc.texts`:
  the question, each choice, the gold answer being one of them), each piece on its own (an n-gram
  never runs from one piece into the next, nor through lm-eval's prompt wording);
* record side: ``instruction``, ``input`` and ``output``, each field on its own;
* a record is contaminated by a task when one of its fields shares at least one n-gram with it.

Speed and memory: the benchmarks become one ``dict`` from the Python ``hash`` of each n-gram's word
tuple to a bit mask of the tasks holding it: ~160-175 bytes of peak RSS per distinct n-gram (330K
n-grams, +55 MiB, for 14K MMLU-sized questions of 10-60 words; 1.3M, +208 MiB, at 10-200 words). A
field's windows are hashed in C (``map(hash, zip(...))``) and tested with ``dict.keys().isdisjoint``,
so a clean field costs no Python-level loop: 250K records of ~280 words scan in ~33 s on one core
(docs/benchmarks.md). ``hash`` of a tuple of str is salted per process (``PYTHONHASHSEED``): the table
lives in one process and is never stored. A 64-bit collision makes a false hit with probability about
(windows scanned x benchmark n-grams) / 2^64, ~1e-6 for 250K records against MMLU; every reported
n-gram is the record's own words, so a report can be checked by eye.
"""

from __future__ import annotations

import dataclasses
import string
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from teams_rl_jax.errors import DataError
from teams_rl_jax.eval.tasks import found_tasks, task_texts

NGRAM_N = 13
FIELDS = ("instruction", "input", "output")
MAX_NGRAMS = 20  # distinct overlapping n-grams listed per task in the report
MAX_EXAMPLES = 10  # (record, field, n-gram, benchmark doc) examples per task
_TABLE = str.maketrans(string.ascii_uppercase, string.ascii_lowercase, string.punctuation)


def normalize(text: str) -> list[str]:
    """lm-eval's Janitor normalisation: ASCII lowercase, ASCII punctuation deleted, whitespace split."""
    return text.translate(_TABLE).split()


def _windows(words: Sequence[str], n: int) -> Iterator[tuple[str, ...]]:
    return zip(*(words[k:] for k in range(n)))


def ngram_keys(words: Sequence[str], n: int) -> Iterator[int]:
    """The hash of each ``n``-word window of ``words`` (none when there are fewer than ``n`` words)."""
    return map(hash, _windows(words, n))


@dataclasses.dataclass
class BenchmarkIndex:
    """Hashed n-grams of the benchmarks: ``table[hash] = bit mask over tasks`` (bit i = ``tasks[i]``)."""

    data_dir: str
    n: int
    tasks: tuple[str, ...]
    docs: dict[str, int]  # docs read per task
    ngrams: dict[str, int]  # distinct n-grams per task
    table: dict[int, int]


def build_index(data_dir: str | Path, n: int = NGRAM_N, tasks: Iterable[str] | None = None) -> BenchmarkIndex:
    """Index every task found under ``data_dir`` (or just ``tasks``); DataError when none is found."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    names = tuple(tasks) if tasks is not None else tuple(found_tasks(data_dir))
    if not names:
        raise DataError(f"{data_dir}: no benchmark files found (layouts: teams_rl_jax.eval.tasks)")
    table: dict[int, int] = {}
    docs, counts = {}, {}
    for bit, task in enumerate(names):
        keys: set[int] = set()
        docs[task] = 0
        for _, texts in task_texts(task, data_dir):
            docs[task] += 1
            for t in texts:
                keys.update(ngram_keys(normalize(t), n))
        counts[task] = len(keys)
        for k in keys:
            table[k] = table.get(k, 0) | (1 << bit)
    return BenchmarkIndex(str(data_dir), n, names, docs, counts, table)


@dataclasses.dataclass
class TaskHits:
    """What one task's n-grams hit: record indices, distinct n-gram keys, capped n-grams and examples."""

    records: set[int] = dataclasses.field(default_factory=set)
    keys: set[int] = dataclasses.field(default_factory=set)
    ngrams: dict[int, str] = dataclasses.field(default_factory=dict)  # key -> text, first MAX_NGRAMS
    examples: list[dict] = dataclasses.field(default_factory=list)  # first MAX_EXAMPLES


def _field_hits(words: list[str], index: BenchmarkIndex) -> Iterator[tuple[int, int, tuple[str, ...]]]:
    table = index.table
    for w in _windows(words, index.n):
        mask = table.get(hash(w))
        if mask:
            yield hash(w), mask, w


def scan(records: Iterable[dict], index: BenchmarkIndex) -> dict[str, TaskHits]:
    """``{task: TaskHits}`` of ``records`` (Alpaca dicts; ``meta.seed_id`` is quoted in examples)."""
    hits = {t: TaskHits() for t in index.tasks}
    keys = index.table.keys()
    for i, rec in enumerate(records):
        for field in FIELDS:
            words = normalize(str(rec.get(field) or ""))
            if len(words) < index.n or keys.isdisjoint(ngram_keys(words, index.n)):
                continue
            seen_tasks: set[str] = set()
            for key, mask, w in _field_hits(words, index):
                for bit, task in enumerate(index.tasks):
                    if not mask >> bit & 1:
                        continue
                    h = hits[task]
                    h.records.add(i)
                    h.keys.add(key)
                    if len(h.ngrams) < MAX_NGRAMS:
                        h.ngrams.setdefault(key, " ".join(w))
                    if task not in seen_tasks and len(h.examples) < MAX_EXAMPLES:
                        seed_id = (rec.get("meta") or {}).get("seed_id")
                        h.examples.append({"record": i, "seed_id": seed_id, "field": field, "ngram": " ".join(w),
                                           "key": key})
                    seen_tasks.add(task)
    return hits


def locate(index: BenchmarkIndex, hits: dict[str, TaskHits]) -> dict[tuple[str, int], str]:
    """``{(task, n-gram key): file:line of the task's first doc holding it}`` for the examples' n-grams
    (a second read of the tasks that were hit: the index keeps no doc positions, to stay small)."""
    out: dict[tuple[str, int], str] = {}
    for task in (t for t in index.tasks if hits[t].examples):
        want = {e["key"] for e in hits[task].examples}
        for where, texts in task_texts(task, index.data_dir):
            for t in texts:
                for k in want.intersection(ngram_keys(normalize(t), index.n)):
                    out.setdefault((task, k), where)
    return out


def contaminated(hits: dict[str, TaskHits]) -> set[int]:
    """Indices of the records any task hit."""
    return set().union(*(h.records for h in hits.values()))


def report(index: BenchmarkIndex, hits: dict[str, TaskHits], n_records: int) -> dict:
    """The JSON report: settings, then per task its docs, n-grams, contaminated records and examples."""
    where = locate(index, hits)
    per = {}
    for task in index.tasks:
        h = hits[task]
        examples = [{**{k: v for k, v in e.items() if k != "key"},
                     "benchmark_doc": _short(where.get((task, e["key"])))} for e in h.examples]
        per[task] = {"docs": index.docs[task], "benchmark_ngrams": index.ngrams[task],
                     "contaminated_records": len(h.records), "overlapping_ngrams": len(h.keys),
                     "ngrams_listed": list(h.ngrams.values()), "examples": examples}
    return {"n": index.n, "fields": list(FIELDS), "records": n_records,
            "normalisation": "lm-eval janitor: ASCII lowercase, ASCII punctuation deleted, whitespace split",
            "contaminated_records": len(contaminated(hits)), "benchmarks": per}


def _short(where: str | None) -> str | None:
    """``file:line`` with the file's name only (reports hold no absolute paths)."""
    if where is None:
        return None
    path, _, line = where.rpartition(":")
    return f"{Path(path).name}:{line}"


def decontamination_report(records: Sequence[dict], data_dir: str | Path, n: int = NGRAM_N) -> tuple[dict, set[int]]:
    """(the report, indices of contaminated records) of ``records`` against every task in ``data_dir``."""
    index = build_index(data_dir, n)
    hits = scan(records, index)
    return report(index, hits, len(records)), contaminated(hits)
