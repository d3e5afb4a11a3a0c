"""A generate output dir's records as a Hugging Face dataset: ``<out>/hf/`` (``layout.HFDatasetDir``).

``hf/data/train-00000-of-00001.parquet`` holds one row per record of ``generated.jsonl`` (same order) in
:data:`COLUMNS`: Alpaca's ``instruction``, ``input``, ``output`` and the record's provenance. ``hf/README.md``
is its dataset card: YAML front matter (task, size category, features, the ``configs`` mapping that
``datasets.load_dataset(hf_dir)`` reads, and the run's provenance under ``teams_rl_jax``) and a text body
(columns, provenance, a note that the license is the user's to set).

Record ids are derived here, not stored in ``generated.jsonl``: ``id`` = ``<seed_id>/<step>`` (a seed
keeps at most one record per step or round), ``parent_id`` = the id of the same seed's previous record
in the dataset, the nearest kept ancestor (the instruction it was evolved from, unless the steps in
between were eliminated or duplicates; an eliminated step leaves the seed at its previous instruction,
so then it is the exact parent), or null for a seed's first record (its parent is the seed itself).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from teams_rl_jax.layout import HFDatasetDir

# (name, dtype, what it holds): dtype is a `datasets` feature dtype, "list<string>" a list of strings.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("instruction", "string", "the evolved instruction"),
    ("input", "string", "the seed's Alpaca input, unchanged (may be empty)"),
    ("output", "string", "the expert's answer"),
    ("id", "string", "`<seed_id>/<step>`"),
    ("parent_id", "string", "the same seed's previous record (nearest kept ancestor); null for its first"),
    ("seed_id", "string", "the seed instruction's id in the seeds file"),
    ("step", "int64", "evolution step (or WizardLM round) that made the instruction, from 1"),
    ("operation", "string", "the operation of that step"),
    ("ops", "list<string>", "every operation applied to the seed up to this record"),
    ("selector", "string", "who chose the operations (policy, random, fixed)"),
    ("judge", "float64", "the reviewer's verdict on the last rewrite (1 = Not Equal; null: not asked)"),
    ("answer_finish", "string", "why the expert's answer ended (stop, length)"),
)
SIZES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
         (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))


def record_id(seed_id: str, step: int) -> str:
    return f"{seed_id}/{step}"


def _row(r: dict, parent_id: str | None) -> dict:
    m = r["meta"]
    return {"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"],
            "id": record_id(m["seed_id"], m["step"]), "parent_id": parent_id, "seed_id": m["seed_id"],
            "step": m["step"], "operation": m["ops"][-1] if m["ops"] else None, "ops": list(m["ops"]),
            "selector": m.get("selector"), "judge": m.get("judge"), "answer_finish": m.get("answer_finish")}


def hf_rows(records: list[dict]) -> list[dict]:
    """One :data:`COLUMNS` row per ``generated.jsonl`` record, in order (ids as the module docstring says)."""
    parent: list[str | None] = [None] * len(records)
    last: dict[str, str] = {}
    for i in sorted(range(len(records)), key=lambda i: records[i]["meta"]["step"]):  # per seed, by step
        m = records[i]["meta"]
        parent[i] = last.get(m["seed_id"])
        last[m["seed_id"]] = record_id(m["seed_id"], m["step"])
    return [_row(r, p) for r, p in zip(records, parent)]


def size_category(n: int) -> str:
    return next((name for bound, name in SIZES if n < bound), "n>1B")


def features_yaml() -> list[dict]:
    """``dataset_info.features`` of the card (the YAML `datasets` writes for these dtypes)."""
    return [{"name": n, "list": "string"} if t == "list<string>" else {"name": n, "dtype": t} for n, t, _ in COLUMNS]


def arrow_schema():
    import pyarrow as pa

    types = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "list<string>": pa.list_(pa.string())}
    return pa.schema([(n, types[t]) for n, t, _ in COLUMNS])


def provenance(summary: dict, *, seeds_file: str | None, protocol: dict, roles: dict[str, dict],
               fingerprint: str) -> dict:
    """The card's provenance (YAML ``teams_rl_jax`` and the text's section) from the stage summary."""
    return {"seeds": {"file": seeds_file or "bundled (teams_rl_jax/data/seeds.jsonl)", "count": summary["seeds"],
                      "done": summary["seeds_done"]},
            "selector": summary["selector"], **protocol, "roles": roles, "kept": summary["kept"],
            "queries": summary["queries"], "paid": summary["paid"], "replayed": summary["replayed"],
            "eliminated": summary["eliminated"], "duplicates": summary["duplicates"], "config_fingerprint": fingerprint}


def _body(n: int, prov: dict) -> str:
    cols = "\n".join(f"| `{name}` | {dtype} | {what} |" for name, dtype, what in COLUMNS)
    roles = "\n".join(f"  - {role}: " + ", ".join(f"{k} `{v}`" for k, v in ident.items())
                      for role, ident in prov["roles"].items()) or "  - none (token-edit operator, no LLM role)"
    by_role = lambda d: ", ".join(f"{r} {v}" for r, v in d.items())  # noqa: E731
    how = ", ".join(f"{k} {prov[k]}" for k in ("protocol", "steps", "rounds", "keep", "operator_role") if k in prov)
    return f"""# TeaMs-RL generated instructions

{n} instruction/answer records in Alpaca form, evolved from seed instructions by the generate stage of
teams-rl-jax (TeaMs-RL: an RL policy picks each evolution operation). Load with
`datasets.load_dataset("<this dir>")` (split `train`).

## Columns

| column | dtype | |
|---|---|---|
{cols}

`id` and `parent_id` are derived when the dataset is written: the same seed's records chain by step.

## Provenance

- seeds: `{prov['seeds']['file']}`, {prov['seeds']['count']} seeds ({prov['seeds']['done']} evolved)
- selector: `{prov['selector']}`; {how}
- roles (model names and checkpoint dirs only):
{roles}
- records kept: {prov['kept']}
- queries by role: {by_role(prov['queries'])} (paid {by_role(prov['paid'])}; replayed from the response
  cache {by_role(prov['replayed'])})
- eliminated by rule: {by_role(prov['eliminated'])}; duplicates dropped: {by_role(prov['duplicates'])}
- config fingerprint: `{prov['config_fingerprint']}`

## License

Not set: the records derive from the seeds file's instructions and the expert model's answers, whose
licenses and terms of use decide it. Add a `license:` key to the YAML above before publishing.
"""


def dataset_card(rows: list[dict], prov: dict):
    """The :class:`huggingface_hub.DatasetCard` of ``rows`` (no license: the user's to set)."""
    from huggingface_hub import DatasetCard, DatasetCardData

    data = DatasetCardData(
        pretty_name="TeaMs-RL generated instructions", size_categories=[size_category(len(rows))],
        task_categories=["text-generation"], tags=["teams-rl-jax", "instruction-tuning", "alpaca"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": HFDatasetDir.data_files()}]}],
        dataset_info={"features": features_yaml()},
        teams_rl_jax=prov)
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{_body(len(rows), prov)}")


def write_hf_dataset(hf: HFDatasetDir, records: list[dict], prov: dict) -> None:
    """Write ``hf`` (one Parquet shard + the card), replacing an older one whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = hf_rows(records)
    tmp = HFDatasetDir(hf.root.with_name(hf.root.name + ".tmp"))
    shutil.rmtree(tmp.root, ignore_errors=True)
    tmp.shard(0, 1).parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema()), tmp.shard(0, 1))
    dataset_card(rows, prov).save(tmp.card)
    shutil.rmtree(hf.root, ignore_errors=True)
    Path(tmp.root).rename(hf.root)


__all__ = ["COLUMNS", "dataset_card", "hf_rows", "provenance", "write_hf_dataset"]
