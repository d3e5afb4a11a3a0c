"""Benchmark decontamination (issue 20): n-gram overlap of generated records with the eval benchmarks.

Planted contamination in tiny benchmark dirs written in the layouts ``eval/tasks.py`` reads. Mutations
tried (a script applied each to the source, ran this file, saw the named test fail, reverted it) are
listed in each test's docstring.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from teams_rl_jax import stages
from teams_rl_jax.backends.base import Completion, QueryCounter
from teams_rl_jax.errors import ConfigError, DataError
from teams_rl_jax.eval import decontaminate as D
from teams_rl_jax.eval import stage as S
from teams_rl_jax.eval.config import BenchmarkSection, EvalConfig, MIASection, ReportSection
from teams_rl_jax.evolve import GenerateConfig, run_generate_stage
from teams_rl_jax.layout import RunLayout
from teams_rl_jax.train_config import TrainConfig

# 20 words; its 13-grams are what a record must share to be contaminated
QUESTION = ("Which of the following best explains why the population of deer grew rapidly after wolves were "
            "removed from the park?")
LONG_CHOICE = "The deer no longer had a predator that kept their numbers in check during the long winter months"
MMLU = {"question": QUESTION, "choices": ["Less rain fell.", LONG_CHOICE, "More hunters came.", "Fires."],
        "answer": 1, "subject": "high_school_biology"}


def _jsonl(path: Path, *recs: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _bench(tmp_path: Path) -> Path:
    d = tmp_path / "bench"
    _jsonl(d / "mmlu.jsonl", MMLU)
    return d


def _hits(records: list[dict], data_dir: Path, n: int = 13) -> set[int]:
    return D.decontamination_report(records, data_dir, n)[1]


def _rec(output: str = "A fine answer.", instruction: str = "Explain ecosystems.", input: str = "") -> dict:
    return {"instruction": instruction, "input": input, "output": output, "meta": {"seed_id": "s0"}}


def test_pasted_question_matches_a_paraphrase_does_not(tmp_path):
    """A benchmark question pasted into an answer is found (record, field, seed, benchmark file:line);
    the same question paraphrased (the same content words, reworded) is not.

    Mutations tried: ``range(n + 1)`` or ``range(n - 1)`` in ``_windows`` (the n-gram count fails);
    :func:`locate` finding nothing (``benchmark_doc`` None: fails)."""
    paste = _rec(output=f"Good question. {QUESTION} The answer is that wolves kept the deer in check.")
    para = _rec(output="Why did deer numbers grow fast once the wolves had been taken out of the park? Which "
                       "explanation of the following is best for that rapid population growth of deer?")
    rep, bad = D.decontamination_report([_rec(), paste, para], _bench(tmp_path))
    assert bad == {1}
    m = rep["benchmarks"]["mmlu"]
    assert m["contaminated_records"] == 1 and m["overlapping_ngrams"] == 20 - 13 + 1 == len(m["ngrams_listed"])
    assert m["examples"][0] == {"record": 1, "seed_id": "s0", "field": "output", "benchmark_doc": "mmlu.jsonl:1",
                                "ngram": " ".join(D.normalize(QUESTION)[:13])}
    assert rep["contaminated_records"] == 1 and rep["n"] == 13


def test_n_boundary_12_words_match_at_12_not_at_13(tmp_path):
    """12 consecutive question words inside unrelated text: no match at n=13, a match at n=12; 13 words
    match at n=13.

    Mutations tried: ``range(n - 1)`` instead of ``range(n)`` in ``_windows`` (12-word windows at n=13:
    the first assertion fails); ``range(n + 1)`` (the 13-word case fails)."""
    words = QUESTION.split()
    d = _bench(tmp_path)
    twelve = _rec(output="Some words first " + " ".join(words[3:15]) + " and other words after")
    thirteen = _rec(output="Some words first " + " ".join(words[3:16]) + " and other words after")
    assert _hits([twelve], d, 13) == set()
    assert _hits([twelve], d, 12) == {0}
    assert _hits([thirteen], d, 13) == {0}


def test_case_and_punctuation_do_not_hide_a_copy(tmp_path):
    """Upper case, added/removed punctuation and an apostrophe still match after lm-eval's normalisation
    (``don't`` and ``dont`` are the same word; ``well-known`` is ``wellknown``).

    Mutations tried: ``_TABLE`` without the upper->lower mapping (the shouted copy fails); punctuation
    mapped to spaces instead of deleted (``well-known`` vs ``wellknown`` fails); punctuation kept
    (``freezes,`` != ``freezes``: fails)."""
    d = tmp_path / "bench"
    q = "Why don't the well-known birds of the northern lakes migrate south when the water freezes in winter?"
    _jsonl(d / "mmlu.jsonl", {**MMLU, "question": q})
    shouted = _rec(output="WHY DON'T THE WELL-KNOWN BIRDS OF THE NORTHERN LAKES MIGRATE SOUTH WHEN THE WATER "
                          "FREEZES, IN WINTER!")
    plain = _rec(instruction="why dont the wellknown birds of the northern lakes migrate south when the water "
                             "freezes in winter")
    assert _hits([shouted, plain], d) == {0, 1}
    assert D.normalize("Don't, WELL-known  x.") == ["dont", "wellknown", "x"]


@pytest.mark.parametrize("field", ["instruction", "input", "output"])
def test_every_field_is_scanned(tmp_path, field):
    """The question pasted into each of instruction, input, output is found, and the example names that field.

    Mutation tried: ``FIELDS = ("instruction", "output")`` (the ``input`` case fails)."""
    rec = {"instruction": "x", "input": "", "output": "y", **{field: QUESTION}}
    rep, bad = D.decontamination_report([rec], _bench(tmp_path))
    assert bad == {0} and rep["benchmarks"]["mmlu"]["examples"][0]["field"] == field


def test_each_layout_and_choices_are_indexed_prompt_wording_is_not(tmp_path):
    """Every task's layout is found in one dir (ARC HF JSONL, HellaSwag, MMLU per-subject folder,
    TruthfulQA folder), a long choice/ending counts as benchmark text and is attributed to its own task;
    lm-eval's prompt wording (MMLU's subject line, TruthfulQA's six-shot prompt) is not benchmark text.

    Mutations tried: ``Doc.texts`` of MMLU without the choices (``(q,)``: the choice paste fails);
    the index built from ``Doc.context`` instead of ``Doc.texts`` (the prompt-wording record is hit)."""
    d = tmp_path / "bench"
    ending = "then carefully pours the beaten eggs into the hot pan and stirs them slowly with a wooden spoon"
    tqa = "Nothing in particular happens if you swallow a watermelon seed because it simply passes through you"
    _jsonl(d / "ARC-Easy" / "test.jsonl", {"question": "Which gas do plants take in?", "answerKey": "A",
                                           "choices": {"text": ["carbon dioxide", "helium"], "label": ["A", "B"]}})
    _jsonl(d / "hellaswag.jsonl", {"activity_label": "Cooking", "ctx_a": "A man cracks an egg.", "ctx_b": "he",
                                   "label": "0", "endings": [ending, "flies away."]})
    _jsonl(d / "mmlu" / "high_school_biology" / "test.jsonl", MMLU)
    _jsonl(d / "truthfulqa" / "validation.jsonl", {
        "question": "What happens if you eat watermelon seeds?",
        "mc1_targets": {"choices": [tqa, "You grow watermelons."], "labels": [1, 0]},
        "mc2_targets": {"choices": [tqa, "You grow watermelons."], "labels": [1, 0]}})
    recs = [_rec(output=f"He {ending}."), _rec(output=LONG_CHOICE), _rec(output=tqa),
            _rec(instruction="The following are multiple choice questions (with answers) about high school "
                             "biology. Q: What is human life expectancy in the United States? A: Human life "
                             "expectancy in the United States is 78 years.")]
    rep, bad = D.decontamination_report(recs, d)
    b = rep["benchmarks"]
    assert set(b) == {"arc_easy", "hellaswag", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2"}
    assert bad == {0, 1, 2}
    assert [e["record"] for e in b["hellaswag"]["examples"]] == [0]
    assert [e["record"] for e in b["mmlu"]["examples"]] == [1]
    assert b["mmlu"]["examples"][0]["benchmark_doc"] == "test.jsonl:1"
    assert [e["record"] for e in b["truthfulqa_mc2"]["examples"]] == [2] and b["arc_easy"]["contaminated_records"] == 0


# ---------------------------------------------------------------------------------------- generate stage
class Stub:
    """A counting backend; ``reply(content) -> str``."""

    def __init__(self, role, reply):
        self.role, self.model, self.counter, self.reply = role, f"stub-{role}", QueryCounter(), reply

    def complete(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, stop=None, seed=None):
        self.counter.add(self.role, len(prompts))
        return [Completion(self.reply(p[-1]["content"])) for p in prompts]

    def score(self, prompts, continuations):
        raise NotImplementedError


def _expert(content: str) -> str:
    """Answers seed 3's instructions by pasting the benchmark question (a contaminated answer)."""
    return f"Answer: {QUESTION}" if "SEED3" in content else "A careful and complete answer, with its reasons."


def _backends() -> dict:
    return {"instructor": Stub("instructor", lambda c: "SEED" + c.split("SEED", 1)[1].split("\n")[0] + " +"),
            "expert": Stub("expert", _expert)}


def _generate(tmp_path: Path, run: str, mode: str, **kw) -> tuple[dict, Path]:
    seeds = _jsonl(tmp_path / "seeds.jsonl", *[{"id": f"s{k}", "instruction": f"SEED{k} explain topic {k}.",
                                                "input": ""} for k in range(5)])
    cfg = GenerateConfig(selector="random", protocol="paper", steps=2, batch_seeds=2, near_dup_threshold=None,
                         baselines=(), cache=False, progress=False, decontaminate=mode,
                         decontaminate_benchmarks_dir=str(_bench(tmp_path)), **kw)
    s = run_generate_stage(cfg, tmp_path / run, backends=_backends(), log=lambda m: None, seeds=str(seeds))
    return s, tmp_path / run / "data"


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_generate_drop_removes_contaminated_records_and_resumes_the_same(tmp_path):
    """``drop``: seed 3's two answers paste the question; generated.jsonl loses exactly them, summary.json
    counts them per task, decontamination.json is written; the shards keep them (the filter runs on the
    merge), so a resumed run (first cut short by a query budget, then completed) and a rerun of a finished
    one leave the same generated.jsonl.

    Mutations tried: the filter called before the merge (the merge then rewrites the unfiltered file:
    fails); ``dropped = 0`` (records stay: fails)."""
    s, out = _generate(tmp_path, "full", "drop")
    recs = _lines(out / "generated.jsonl")
    assert len(recs) == 8 and not any(r["meta"]["seed_id"] == "s3" for r in recs)
    assert s["decontaminated"]["mmlu"] == 2 and s["kept"] == 10
    assert s["decontamination"] == {"mode": "drop", "n": 13, "records_scanned": 10, "contaminated_records": 2,
                                    "dropped": 2}
    assert json.loads((out / "summary.json").read_text())["decontaminated"] == {"mmlu": 2}
    assert json.loads((out / "decontamination.json").read_text())["benchmarks"]["mmlu"]["contaminated_records"] == 2
    assert sum(r["meta"]["seed_id"] == "s3" for r in _lines(out / "shards" / "generated.00000.jsonl")) == 2
    first = (out / "generated.jsonl").read_bytes()
    _generate(tmp_path, "full", "drop")  # a rerun of the finished stage: merge + filter again
    assert (out / "generated.jsonl").read_bytes() == first

    s_cut, _ = _generate(tmp_path, "resumed", "drop", max_queries=4)  # two seeds, then the budget stops it
    assert s_cut["seeds_done"] < 5
    s2, out2 = _generate(tmp_path, "resumed", "drop")
    assert (out2 / "generated.jsonl").read_bytes() == first and s2["decontaminated"] == s["decontaminated"]


def test_generate_report_keeps_records_and_off_writes_nothing(tmp_path):
    """``report`` counts without dropping; ``off`` (the default) adds no summary key and no file.

    Mutations tried: ``dropped = len(bad)`` whatever the mode (report mode then drops: fails); the filter
    called before the merge (nothing counted: fails)."""
    s, out = _generate(tmp_path, "report", "report")
    assert len(_lines(out / "generated.jsonl")) == 10 and s["decontamination"]["dropped"] == 0
    assert s["decontaminated"]["mmlu"] == 2
    s, out = _generate(tmp_path, "off", "off")
    assert "decontaminated" not in s and not (out / "decontamination.json").exists()


def test_generate_config_errors_name_the_key():
    """One-line ConfigErrors naming the key (mutation tried: the dir check removed: fails)."""
    with pytest.raises(ConfigError, match="^decontaminate_benchmarks_dir: needed with decontaminate: drop"):
        GenerateConfig(decontaminate="drop").validate()
    with pytest.raises(ConfigError, match="^decontaminate: unknown 'yes'"):
        GenerateConfig(decontaminate="yes", decontaminate_benchmarks_dir="x").validate()
    with pytest.raises(ConfigError, match="^decontaminate_n must be >= 1"):
        GenerateConfig(decontaminate="report", decontaminate_benchmarks_dir="x", decontaminate_n=0).validate()


def test_generate_stops_before_any_query_without_benchmark_files(tmp_path):
    """A missing or empty benchmark dir is a one-line DataError before the first query (not after the
    whole generation was paid for). Mutation tried: the early check removed (the stubs are called: fails)."""
    bk = _backends()
    for d in (tmp_path / "missing", tmp_path):
        cfg = GenerateConfig(selector="random", protocol="paper", baselines=(), cache=False, progress=False,
                             decontaminate="drop", decontaminate_benchmarks_dir=str(d))
        with pytest.raises(DataError):
            run_generate_stage(cfg, tmp_path / "run", backends=bk, log=lambda m: None)
    assert all(sum(b.counter.snapshot().values()) == 0 for b in bk.values())


def test_benchmark_content_is_in_the_generate_fingerprint(tmp_path):
    """Another benchmark file content = another generate fingerprint (a rerun asks for --force).

    Mutation tried: ``own_config`` without the ``decontaminate_benchmarks`` key (fingerprints equal: fails)."""
    d = _bench(tmp_path)
    cfg = TrainConfig(generate=GenerateConfig(selector="random", decontaminate="drop",
                                                 decontaminate_benchmarks_dir=str(d)))
    before = stages.fingerprint(cfg, "generate")
    assert before == stages.fingerprint(cfg, "generate")
    _jsonl(d / "mmlu.jsonl", {**MMLU, "question": QUESTION + " Explain."})
    assert stages.fingerprint(cfg, "generate") != before


# -------------------------------------------------------------------------------------------- eval stage
def test_eval_stage_writes_the_decontamination_report(tmp_path, monkeypatch):
    """With ``eval.benchmarks.data_dir`` set, report.json gets ``decontamination`` for data/generated.jsonl
    and report.md a section with the per-task table and an example (the scoring itself is stubbed here: it
    is test_eval_report's subject).

    Mutations tried: the markdown section not rendered (fails); n +- 1 and MMLU's choices left out of
    ``Doc.texts`` (the counts fail)."""
    run = RunLayout(tmp_path / "run")
    _jsonl(run.data.records, _rec(), _rec(output=QUESTION), _rec(instruction=LONG_CHOICE))
    run.sft.hf.mkdir(parents=True)
    (run.sft.hf / "config.json").write_text("{}")
    monkeypatch.setattr(S, "evaluate_checkpoint", lambda *a, **k: {})
    cfg = EvalConfig(benchmarks=BenchmarkSection(data_dir=str(_bench(tmp_path))), mia=MIASection(enabled=False),
                     report=ReportSection(enabled=False))
    rep = S.run_eval_stage(cfg, run.root, log=lambda m: None)
    dec = json.loads(run.eval.report_json.read_text())["decontamination"]
    assert dec == rep["decontamination"] and dec["contaminated_records"] == 2 and dec["records"] == 3
    assert [(e["record"], e["field"]) for e in dec["benchmarks"]["mmlu"]["examples"]] == [(1, "output"),
                                                                                         (2, "instruction")]
    md = run.eval.report_md.read_text()
    assert "## Decontamination" in md and "2 of 3 generated records" in md
    assert "| mmlu | 1 | 14 | 2 | 14 |" in md  # (20 - 12) + (18 - 12) n-grams, all overlapping
