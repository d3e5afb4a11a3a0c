"""Benchmark readers: ARC-Easy/Challenge, HellaSwag, MMLU, TruthfulQA-MC1/MC2 from a local directory.

Each task becomes a list of :class:`Doc` (context, choices, gold) built exactly as lm-evaluation-harness'
own task YAMLs build them (prompt wording, HellaSwag preprocessing, MMLU's subject description), so
scores are comparable with published lm-eval numbers. Nothing is downloaded.

Where a task's records are looked up in ``data_dir`` (first match wins):

* ``<data_dir>/<task>.jsonl`` or ``<data_dir>/<task>.parquet``;
* a folder ``<data_dir>/<name>/`` (searched recursively) with ``*.jsonl``/``*.parquet`` files, for
  ``<name>`` in the task's aliases (``ARC-Easy``, ``hellaswag``, ``mmlu``/``all``, ``truthfulqa``,
  ``multiple_choice`` ...): the Hugging Face snapshot layouts. Files whose name starts with the
  task's evaluation split (``test`` for ARC and MMLU, ``validation`` for HellaSwag and TruthfulQA)
  are used when present, else all files; they are read in sorted order.

Record layouts (both the Hugging Face datasets and the original releases):

* ARC: ``{"question": str, "choices": {"text": [...], "label": [...]}, "answerKey": "A"}`` (HF) or
  ``{"question": {"stem": str, "choices": [{"text", "label"}, ...]}, "answerKey"}`` (AI2 JSONL).
* HellaSwag: ``{"activity_label", "ctx_a", "ctx_b", "endings": [4], "label"}`` (label int or str).
* MMLU: ``{"question", "choices": [4], "answer": int or "A".."D", "subject"?}``.
* TruthfulQA: ``{"question", "mc1_targets": {"choices", "labels"}, "mc2_targets": {...}}``.

A missing file raises :class:`DataError` naming the paths tried; a malformed record names
``file:line`` (JSONL) or ``file:row N`` (Parquet).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from teams_rl_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class Doc:
    """One multiple-choice example: score ``context`` + ``delimiter`` + each choice.

    ``gold``: the correct choice index (MC1-style tasks) ; ``labels``: 0/1 per choice for
    TruthfulQA-MC2 (whose metric is the normalised probability mass on the true choices).
    """

    context: str
    choices: tuple[str, ...]
    gold: int
    labels: tuple[int, ...] | None = None
    where: str = ""  # file:line, for messages
    delimiter: str = " "  # lm-eval's default target_delimiter
    # The record's own text pieces (question, then every choice as written in the file, gold included),
    # without prompt wording: what decontamination (:mod:`teams_rl_jax.eval.decontaminate`) looks for.
    texts: tuple[str, ...] = ()


# ---- readers of raw records ---------------------------------------------------------------------------------
def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{i}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: invalid JSON ({e.msg})") from None


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types; report one line
        raise DataError(f"{path}: cannot read Parquet ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}:row {i}", row


def _records(files: list[Path]) -> Iterator[tuple[str, Any]]:
    for f in files:
        yield from (_iter_parquet(f) if f.suffix == ".parquet" else _iter_jsonl(f))


# ---- record -> Doc (lm-eval's task definitions) ---------------------------------------------------------------
def _need(rec: Any, key: str, where: str, kind: type | tuple = str) -> Any:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if key not in rec or rec[key] is None:
        raise DataError(f"{where}: missing key '{key}'")
    if not isinstance(rec[key], kind):
        raise DataError(f"{where}: '{key}' has the wrong type ({type(rec[key]).__name__})")
    return rec[key]


def _arc(rec: Any, where: str) -> Doc:
    q = _need(rec, "question", where, (str, dict))
    if isinstance(q, dict):  # AI2's original JSONL: question.stem + question.choices[{text, label}]
        stem = _need(q, "stem", where)
        ch = _need(q, "choices", where, list)
        texts = [_need(c, "text", where) for c in ch]
        labels = [_need(c, "label", where) for c in ch]
    else:
        stem = q
        ch = _need(rec, "choices", where, dict)
        texts, labels = list(_need(ch, "text", where, list)), list(_need(ch, "label", where, list))
    key = str(_need(rec, "answerKey", where, (str, int)))
    if key not in labels or len(texts) != len(labels) or len(texts) < 2:
        raise DataError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
    return Doc(f"Question: {stem}\nAnswer:", tuple(texts), labels.index(key), where=where, texts=(stem, *texts))


def _hellaswag_pre(text: str) -> str:  # lm-eval tasks/hellaswag/utils.py: preprocess
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(rec: Any, where: str) -> Doc:
    ctx = _need(rec, "ctx_a", where) + " " + _need(rec, "ctx_b", where).capitalize()
    endings = _need(rec, "endings", where, list)
    label = _need(rec, "label", where, (str, int))
    try:
        gold = int(label)
    except ValueError:
        raise DataError(f"{where}: label {label!r} is not an integer") from None
    if not 0 <= gold < len(endings):
        raise DataError(f"{where}: label {gold} out of range for {len(endings)} endings")
    query = _hellaswag_pre(_need(rec, "activity_label", where) + ": " + ctx)
    choices = tuple(_hellaswag_pre(e) for e in endings)
    return Doc(query, choices, gold, where=where, texts=(_hellaswag_pre(ctx), *choices))


def _mmlu(rec: Any, where: str, subject: str | None) -> Doc:
    q = _need(rec, "question", where).strip()
    ch = _need(rec, "choices", where, list)
    if len(ch) != 4:
        raise DataError(f"{where}: MMLU needs 4 choices, got {len(ch)}")
    ans = _need(rec, "answer", where, (str, int))
    gold = "ABCD".index(ans) if isinstance(ans, str) and ans in "ABCD" and len(ans) == 1 else ans
    if not isinstance(gold, int) or not 0 <= gold < 4:
        raise DataError(f"{where}: answer {ans!r} is not 0-3 or A-D")
    subject = rec.get("subject") or subject
    # lm-eval mmlu/default: a per-subject description, then the question and lettered choices.
    desc = (f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
            if subject else "")
    text = f"{desc}{q}\nA. {ch[0]}\nB. {ch[1]}\nC. {ch[2]}\nD. {ch[3]}\nAnswer:"
    return Doc(text, ("A", "B", "C", "D"), gold, where=where, texts=(q, *map(str, ch)))


_TQA_PROMPT = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


def _truthfulqa(rec: Any, where: str, key: str) -> Doc:
    q = _need(rec, "question", where)
    targets = _need(rec, key, where, dict)
    choices = list(_need(targets, "choices", where, list))
    labels = [int(x) for x in _need(targets, "labels", where, list)]
    if len(choices) != len(labels) or len(choices) < 2 or 1 not in labels:
        raise DataError(f"{where}: '{key}' needs as many labels as choices (>= 2) with at least one true")
    context = _TQA_PROMPT + "\n\nQ: " + q + "\nA:"
    # lm-eval: doc_to_target 0 (the first choice is the true one in MC1); MC2 uses the labels.
    return Doc(context, tuple(choices), 0, labels=tuple(labels) if key == "mc2_targets" else None, where=where,
               texts=(q, *choices))


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Where a task's files are and how a record becomes a Doc."""

    name: str
    aliases: tuple[str, ...]  # file stems / folder names to look for
    split: str  # preferred file-name prefix inside a folder
    build: Callable[[Any, str, Path], Doc]


def _mmlu_build(rec: Any, where: str, path: Path) -> Doc:
    # cais/mmlu per-subject folders name the subject; the "all" config carries a "subject" field.
    subject = path.parent.name if path.parent.name not in ("all", "mmlu", "data") else None
    return _mmlu(rec, where, subject)


TASKS: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec("arc_easy", ("arc_easy", "ARC-Easy"), "test", lambda r, w, p: _arc(r, w)),
    "arc_challenge": TaskSpec("arc_challenge", ("arc_challenge", "ARC-Challenge"), "test", lambda r, w, p: _arc(r, w)),
    "hellaswag": TaskSpec("hellaswag", ("hellaswag",), "validation", lambda r, w, p: _hellaswag(r, w)),
    "mmlu": TaskSpec("mmlu", ("mmlu",), "test", _mmlu_build),
    "truthfulqa_mc1": TaskSpec("truthfulqa_mc1", ("truthfulqa_mc1", "truthfulqa_mc", "truthfulqa", "multiple_choice"),
                               "validation", lambda r, w, p: _truthfulqa(r, w, "mc1_targets")),
    "truthfulqa_mc2": TaskSpec("truthfulqa_mc2", ("truthfulqa_mc2", "truthfulqa_mc", "truthfulqa", "multiple_choice"),
                               "validation", lambda r, w, p: _truthfulqa(r, w, "mc2_targets")),
}


def task_files(task: str, data_dir: str | Path) -> list[Path]:
    """The files holding ``task`` under ``data_dir`` (see the module docstring); DataError if none."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r} (valid: {', '.join(TASKS)})")
    spec, root = TASKS[task], Path(data_dir)
    if not root.is_dir():
        raise DataError(f"benchmark data dir not found: {root}")
    tried = []
    for name in spec.aliases:
        for ext in (".jsonl", ".parquet"):
            f = root / f"{name}{ext}"
            tried.append(str(f))
            if f.is_file():
                return [f]
        d = root / name
        tried.append(f"{d}/")
        if d.is_dir():
            files = sorted(p for p in d.rglob("*") if p.suffix in (".jsonl", ".parquet") and p.is_file())
            preferred = [p for p in files if p.name.startswith(spec.split)]
            if preferred or files:
                return preferred or files
    raise DataError(f"benchmark file for task '{task}' not found (tried {', '.join(tried)})")


def load_task(task: str, data_dir: str | Path, limit: int | None = None) -> list[Doc]:
    """The first ``limit`` docs of ``task`` read from ``data_dir``."""
    spec = TASKS[task] if task in TASKS else None
    files = task_files(task, data_dir)
    docs: list[Doc] = []
    for f in files:
        for where, rec in _records([f]):
            docs.append(spec.build(rec, where, f))
            if limit is not None and len(docs) >= limit:
                return docs
    if not docs:
        raise DataError(f"{files[0]}: no records for task '{task}'")
    return docs


def found_tasks(data_dir: str | Path) -> list[str]:
    """The tasks of :data:`TASKS` that have files under ``data_dir`` (DataError if it is not a directory)."""
    if not Path(data_dir).is_dir():
        raise DataError(f"benchmark data dir not found: {data_dir}")
    out = []
    for task in TASKS:
        try:
            task_files(task, data_dir)
        except DataError:
            continue
        out.append(task)
    return out


def task_texts(task: str, data_dir: str | Path) -> Iterator[tuple[str, tuple[str, ...]]]:
    """``(file:line, the doc's raw text pieces)`` for every doc of ``task`` (see :attr:`Doc.texts`)."""
    for d in load_task(task, data_dir):
        yield d.where, d.texts
