"""The generated dataset as a Hugging Face dataset (``run/data/hf/``) and the SFT export's model card
(issue 20). Checked with the Hugging Face libraries themselves (``datasets.load_dataset``,
``huggingface_hub.DatasetCard`` / ``ModelCard``), never with our readers.

The generate stage runs on counting stub backends (``test_generate_protocols``): the instructor appends
`` +``, the expert names the instruction it answers, the reviewer says "Equal" (rule 1: no gain) to a few
fixed calls so that some seeds lose a step and their next record's parent is an older one.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from test_generate_protocols import answer, grow, stubs

from teams_rl_jax import config as cfglib
from teams_rl_jax import stages
from teams_rl_jax.backends.config import RoleConfig, RolesConfig
from teams_rl_jax.evolve import GenerateConfig, run_generate_stage
from teams_rl_jax.layout import RunLayout
from teams_rl_jax.sft.config import SFTConfig
from teams_rl_jax.sft.model_card import sft_card, update_card_with_eval

datasets = pytest.importorskip("datasets")
hub = pytest.importorskip("huggingface_hub")

COLUMNS = ["instruction", "input", "output", "id", "parent_id", "seed_id", "step", "operation", "ops", "selector",
           "judge", "answer_finish"]
SECRET_ENV, SECRET = "TEAMS_HF_TEST_KEY", "sk-test-0123456789abcdef"
URL_TOKEN = "urltoken-s3cr3t"
TINY = dict(model_type="llama", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, initializer_range=0.05, bos_token_id=1, eos_token_id=2)


def _openai(model: str) -> RoleConfig:
    return RoleConfig(backend="openai", base_url=f"http://user:{URL_TOKEN}@llm.internal:8000/v1", model=model,
                      api_key_env=SECRET_ENV)


ROLES = RolesConfig(instructor=_openai("inst-7b"), reviewer=_openai("rev-7b"),
                    expert=RoleConfig(backend="flax", checkpoint="/models/expert-7b"))


def _generate(tmp_path: Path, monkeypatch, **kw) -> tuple[RunLayout, dict]:
    """A run dir whose generate stage ran on stubs: 7 seeds (odd ones with an Alpaca input), 3 steps."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"id": f"s{k}", "instruction": f"SEED{k} explain topic {k}.",
                                         "input": f"context {k}" if k % 2 else ""}) + "\n" for k in range(7)))
    calls = itertools.count()
    equal_at = {4, 9}  # the reviewer's 5th and 10th verdicts: step 2 of two seeds eliminated
    reviewer = lambda c: "Equal" if next(calls) in equal_at else "Not Equal"  # noqa: E731
    cfg = GenerateConfig(**{**dict(selector="random", steps=3, batch_seeds=3, near_dup_threshold=None, baselines=(),
                                   cache=False, progress=False), **kw})
    run = RunLayout(tmp_path / "run")
    summary = run_generate_stage(cfg, run.root, ROLES, backends=stubs(reviewer, grow, answer), seeds=str(seeds),
                                 log=lambda m: None)
    return run, summary


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _expected_parent(records: list[dict], r: dict) -> str | None:
    """The same seed's kept record with the largest step below ``r``'s (None: ``r`` is its first)."""
    older = [o["meta"]["step"] for o in records if o["meta"]["seed_id"] == r["meta"]["seed_id"]
             and o["meta"]["step"] < r["meta"]["step"]]
    return f"{r['meta']['seed_id']}/{max(older)}" if older else None


def test_generated_dataset_loads_with_datasets_equal_to_the_records(tmp_path, monkeypatch):
    """``load_dataset("parquet", data_files=...)`` and ``load_dataset(<hf dir>)`` (through the card's
    ``configs``) both give generated.jsonl's records, in order, with the provenance columns and dtypes.

    Mutations tried (each fails here): the ``ops`` column dropped from ``COLUMNS``; ``parent_id`` = step - 1
    whatever was kept (the two eliminated steps catch it); rows sorted by step instead of kept in file order;
    the card's ``data_files`` glob pointing at ``train/*``; ``step`` written as a string; the stage not writing
    the hf dir.
    """
    run, summary = _generate(tmp_path, monkeypatch)
    records = _records(run.data.records)
    assert len(records) == summary["kept"] and summary["eliminated"]["no_gain"] == 2
    hf = run.data.hf
    assert sorted(p.name for p in (hf.root / "data").iterdir()) == ["train-00000-of-00001.parquet"]
    by_files = datasets.load_dataset("parquet", data_files=str(hf.root / "data" / "*.parquet"),
                                     cache_dir=str(tmp_path / "hf_cache"))["train"]
    by_dir = datasets.load_dataset(str(hf.root), cache_dir=str(tmp_path / "hf_cache2"))
    assert list(by_dir) == ["train"]
    for ds in (by_files, by_dir["train"]):
        assert ds.column_names == COLUMNS and ds.num_rows == len(records)
        for key in ("instruction", "input", "output"):
            assert ds[key] == [r[key] for r in records]
        for key in ("seed_id", "step", "ops", "selector", "judge", "answer_finish"):
            assert ds[key] == [r["meta"][key] for r in records], key
        assert ds["operation"] == [r["meta"]["ops"][-1] for r in records]
        assert ds["id"] == [f"{r['meta']['seed_id']}/{r['meta']['step']}" for r in records]
        assert ds["parent_id"] == [_expected_parent(records, r) for r in records]
        f = ds.features
        assert (f["step"].dtype, f["judge"].dtype, f["instruction"].dtype) == ("int64", "float64", "string")
        assert f["ops"].feature.dtype == "string"
    parents = by_dir["train"]["parent_id"]
    skipped = [s for s, p in zip(by_dir["train"]["step"], parents) if p is not None and int(p.split("/")[1]) != s - 1]
    assert skipped and any(r["input"] for r in records)  # the fixture exercises an eliminated step and inputs


def test_dataset_card_parses_with_provenance_and_no_secret(tmp_path, monkeypatch):
    """``DatasetCard.load`` reads the card: task, size, features, configs, no license (the user's), and the
    provenance (seeds, selector/protocol, roles' models, queries paid/replayed, eliminations, fingerprint); no
    API key, endpoint or URL token anywhere in it. A baseline's output dir gets its own dataset dir.

    Mutations tried (each fails here): ``public_identity`` returning the whole RoleConfig (base_url with its token
    leaks); the provenance's ``paid`` taken from the summary's ``replayed``; the eliminations left out of the
    provenance; a ``license: other`` default; the features' ``ops`` as ``dtype: string``; baselines' output
    dirs without an hf dir.
    """
    run, summary = _generate(tmp_path, monkeypatch, selector="fixed", baselines=("random",))
    text = run.data.hf.card.read_text()
    for secret in (SECRET, URL_TOKEN, "llm.internal", SECRET_ENV):
        assert secret not in text, secret
    card = hub.DatasetCard.load(run.data.hf.card)
    d = card.data
    assert d.task_categories == ["text-generation"] and d.size_categories == ["n<1K"] and d.license is None
    assert "license" in card.text.lower()
    assert d.configs == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]
    feats = {f["name"]: f for f in d.dataset_info["features"]}
    assert list(feats) == COLUMNS and feats["ops"] == {"name": "ops", "list": "string"}
    assert feats["step"]["dtype"] == "int64"
    prov = d.teams_rl_jax
    assert prov["seeds"] == {"file": str(tmp_path / "seeds.jsonl"), "count": 7, "done": 7}
    assert (prov["selector"], prov["protocol"], prov["steps"], prov["keep"]) == ("fixed", "filtered", 3, "all")
    assert prov["roles"] == {"instructor": {"backend": "openai", "model": "inst-7b", "max_new_tokens": 256},
                             "reviewer": {"backend": "openai", "model": "rev-7b", "max_new_tokens": 8},
                             "expert": {"backend": "flax", "model": "expert-7b", "checkpoint": "/models/expert-7b",
                                        "max_new_tokens": 512}}
    for key in ("queries", "paid", "replayed", "eliminated", "duplicates", "kept"):
        assert prov[key] == summary[key], key
    assert prov["eliminated"]["no_gain"] == 2 and len(prov["config_fingerprint"]) == 16
    base = run.data.baseline("random").hf
    assert hub.DatasetCard.load(base.card).data.teams_rl_jax["selector"] == "random"
    assert datasets.load_dataset(str(base.root), cache_dir=str(tmp_path / "c"))["train"].num_rows == \
        len(_records(run.data.baseline("random").records))


def test_sft_export_model_card_and_eval_results(tmp_path, monkeypatch):
    """A tiny SFT run on the generated dataset leaves ``sft/hf/README.md``: ``ModelCard.load`` reads it (base
    model, dataset path and its card, lr, steps, batch, sequence length, full fine-tuning); the eval stage's
    update adds ``model-index`` eval results and its text, replacing an earlier one, and leaves the export's
    digest (what eval and later stages depend on) unchanged.

    Mutations tried (each fails here): ``stages._export_files`` digesting every file of the export (the card
    with it); ``with_eval`` appending a second Evaluation section; eval results left out of the YAML; the card
    naming the bundled demo set instead of the dataset trained on.
    """
    from teams_rl_jax.sft.loop import train

    run, _ = _generate(tmp_path, monkeypatch)
    cfg = cfglib.from_dict(SFTConfig, {"model": {"config": TINY}, "max_steps": 1, "global_batch": 2, "tensorboard": False,
                                       "data": {"max_seq_len": 64, "path": "auto"}, "optim": {"lr": 3e-4},
                                       "checkpoint": {"every": 100, "async_save": False}})
    train(cfg, run.root, log=lambda m: None)
    path = run.sft.model_card
    card = hub.ModelCard.load(path)
    assert (card.data.library_name, card.data.pipeline_tag) == ("transformers", "text-generation")
    assert card.data.tags == ["teams-rl-jax", "sft"] and card.data.license is None and not card.data.eval_results
    for needle in (f"`{run.data.records}`", f"`{run.data.hf.card}`", "full fine-tuning", "lr 0.0003", "steps: 1",
                   "2 sequences per step", "max sequence length 64", "random initialisation", "Not evaluated yet"):
        assert needle in card.text, needle
    digest = stages.produced(run, "sft")
    report = {"benchmarks": {"arc_easy": {"acc": 0.25, "acc_norm": 0.5, "n": 4}},
              "mia": {"loss": {"auc": 0.625, "tpr_at_1pct_fpr": 0.0, "members": 4, "non_members": 4}}}
    assert update_card_with_eval(path, {"benchmarks": {"arc_easy": {"acc": 0.9, "n": 4}}})
    assert update_card_with_eval(path, report)  # a redone eval replaces the first results
    card = hub.ModelCard.load(path)
    got = {(e.dataset_name, e.metric_type): e.metric_value for e in card.data.eval_results}
    assert got == {("arc_easy", "acc"): 0.25, ("arc_easy", "acc_norm"): 0.5}
    assert card.text.count("## Evaluation") == 1 and "Not evaluated yet" not in card.text
    assert "AUC 0.625" in card.text and "acc 0.9000" not in card.text and "## SFT settings" in card.text
    assert stages.produced(run, "sft") == digest
    assert not update_card_with_eval(tmp_path / "none" / "README.md", report)


def test_lora_model_card_names_the_adapters(tmp_path):
    """The card of a LoRA run (built without training) says LoRA with its rank and targets and tags it.
    Mutation tried: the method line ignoring ``lora.rank`` (says full fine-tuning) fails here."""
    cfg = cfglib.from_dict(SFTConfig, {"model": {"path": "/models/base-7b"}, "lora": {"rank": 4, "targets": ["q_proj"]}})
    card = sft_card(cfg, data_path=tmp_path / "a.jsonl", steps=10, name="x")
    assert "LoRA rank 4" in card.text and "q_proj" in card.text and "full fine-tuning" not in card.text
    assert "`/models/base-7b`" in card.text and card.data.tags == ["teams-rl-jax", "sft", "lora"]
