"""Benchmark readers build the same prompts, choices and gold labels as lm-eval's own task YAMLs.

Each record (in the Hugging Face dataset layout) is rendered with lm-eval's ``doc_to_text`` /
``doc_to_choice`` / ``doc_to_target`` (Jinja, via ``lm_eval.utils.apply_template``; HellaSwag after its
``process_docs``) read from the installed task YAMLs, and compared with our :class:`Doc`. Catches any
prompt drift (a missing newline, MMLU's subject description, HellaSwag's bracket cleanup).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
import lm_eval  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402
from lm_eval.utils import apply_template  # noqa: E402

from teams_rl_jax.errors import DataError  # noqa: E402
from teams_rl_jax.eval import testing as T  # noqa: E402
from teams_rl_jax.eval.tasks import load_task  # noqa: E402

TASKS = Path(lm_eval.__file__).parent / "tasks"

ARC = {"id": "x", "question": "Which gas do plants take in?", "choices": {"text": ["oxygen", "carbon dioxide",
                                                                                  "helium"], "label": ["A", "B", "C"]},
       "answerKey": "B"}
HELLASWAG = {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow [step] "
             "covering the window of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then",
             "endings": [", the man adds wax to the windshield [title] and cuts it.", ", a person board a ski lift.",
                         ", the man puts on a christmas coat.", ", the man continues removing the snow on his car."],
             "label": "3", "source_id": "x", "split": "val", "split_type": "indomain"}
MMLU = {"question": " What is 2+2? ", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "22"], "answer": 1}
TQA = {"question": "What happens if you eat watermelon seeds?",
       "mc1_targets": {"choices": ["Nothing happens.", "You grow watermelons."], "labels": [1, 0]},
       "mc2_targets": {"choices": ["Nothing happens.", "They pass through.", "You grow watermelons."],
                       "labels": [1, 1, 0]}}


def _render(cfg: dict, doc: dict):
    text = apply_template(cfg["doc_to_text"], doc)
    choice = cfg["doc_to_choice"]
    choices = choice if isinstance(choice, list) else (
        doc[choice] if choice in doc else ast.literal_eval(apply_template(choice, doc)))
    target = cfg["doc_to_target"]
    gold = target if isinstance(target, int) else (
        int(apply_template(target, doc)) if "{{" in str(target) else int(doc[target]))
    return text, list(choices), gold


@pytest.mark.parametrize("task,yaml,rec,fname", [
    ("arc_easy", "arc/arc_easy.yaml", ARC, "arc_easy.jsonl"),
    ("arc_challenge", "arc/arc_challenge.yaml", ARC, "ARC-Challenge/test-00000-of-00001.jsonl"),
    ("mmlu", "mmlu/default/mmlu_elementary_mathematics.yaml", MMLU, "mmlu.jsonl"),
    ("mmlu", "mmlu/default/mmlu_elementary_mathematics.yaml", {k: v for k, v in MMLU.items() if k != "subject"},
     "mmlu/elementary_mathematics/test-00000-of-00001.jsonl"),  # cais/mmlu per-subject folder: no subject field
    ("truthfulqa_mc1", "truthfulqa/truthfulqa_mc1.yaml", TQA, "truthfulqa/validation.jsonl"),
    ("truthfulqa_mc2", "truthfulqa/truthfulqa_mc2.yaml", TQA, "truthfulqa_mc.jsonl"),
    ("hellaswag", "hellaswag/hellaswag.yaml", HELLASWAG, "hellaswag.jsonl"),
])
def test_reader_matches_lm_eval_yaml(tmp_path, task, yaml, rec, fname):
    cfg = load_yaml(TASKS / yaml)
    doc = dict(rec)
    if "process_docs" in cfg:
        import datasets

        doc = cfg["process_docs"](datasets.Dataset.from_list([rec]))[0]
    text, choices, gold = _render(cfg, doc)
    text = cfg.get("description", "") + text  # lm-eval prepends the task description (MMLU's subject line)
    T.write_jsonl(tmp_path / fname, [rec])
    d, = load_task(task, tmp_path)
    assert d.context == text and list(d.choices) == choices and d.gold == gold, (task, d)
    if task == "truthfulqa_mc2":
        assert d.labels == (1, 1, 0)


def test_parquet_layout_and_limit(tmp_path):
    """The Hugging Face Parquet snapshot layout (``ARC-Easy/test-*.parquet``) reads the test split only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "ARC-Easy"
    d.mkdir()
    recs = T.arc_records(5, seed=2)
    pq.write_table(pa.Table.from_pylist(recs), d / "test-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(T.arc_records(3, seed=9)), d / "train-00000-of-00001.parquet")
    docs = load_task("arc_easy", tmp_path)
    assert len(docs) == 5 and docs[0].context == f"Question: {recs[0]['question']}\nAnswer:"
    assert len(load_task("arc_easy", tmp_path, limit=2)) == 2
    recs[3]["answerKey"] = "Z"
    pq.write_table(pa.Table.from_pylist(recs), d / "test-00000-of-00001.parquet")
    with pytest.raises(DataError, match=r"test-00000-of-00001.parquet:row 3: answerKey 'Z'"):
        load_task("arc_easy", tmp_path)


def test_bad_json_names_line(tmp_path):
    (tmp_path / "hellaswag.jsonl").write_text('{"a": 1}\n{not json\n')
    with pytest.raises(DataError, match=r"hellaswag.jsonl:1: missing key 'ctx_a'"):
        load_task("hellaswag", tmp_path)
    (tmp_path / "hellaswag.jsonl").write_text(
        '{"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["d", "e"], "label": 1}\n{not json\n')
    with pytest.raises(DataError, match=r"hellaswag.jsonl:2: invalid JSON"):
        load_task("hellaswag", tmp_path)
