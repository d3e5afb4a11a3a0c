"""The one seed reader (teams_rl_jax.data.seeds) and the one bundled seed file.

Mutations tried (each fails a test here): folding ``input`` into ``instruction``; dropping the
duplicate-id check; ignoring ``limit``; reporting a bad record without its line; env and generate
reading different files.
"""
import json

import pytest

from teams_rl_jax.data.seeds import Seed, check_seed_file, read_seeds
from teams_rl_jax.env.seeds import read_seed_records
from teams_rl_jax.errors import DataError

RECS = [{"instruction": "Sort a list.", "input": "3, 1, 2", "id": "a", "domain": "coding"},
        {"instruction": "Name a colour.", "domain": "arts"},
        {"instruction": "  Explain rain. ", "input": None}]


def _want():
    return [Seed("a", "Sort a list.", "3, 1, 2", "coding"), Seed("seed-00001", "Name a colour.", "", "arts"),
            Seed("seed-00002", "Explain rain.", "", None)]


def test_alpaca_json_list_jsonl_and_parquet_read_alike(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(RECS, indent=2))
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECS) + "\n")
    assert read_seeds(tmp_path / "s.json") == _want()
    assert read_seeds(tmp_path / "s.jsonl") == _want()
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(RECS), tmp_path / "s.parquet")
    assert read_seeds(tmp_path / "s.parquet") == _want()


def test_input_stays_a_separate_field(tmp_path):
    (tmp_path / "s.jsonl").write_text(json.dumps(RECS[0]) + "\n")
    s = read_seeds(tmp_path / "s.jsonl")[0]
    assert (s.instruction, s.input) == ("Sort a list.", "3, 1, 2")
    assert s.text == "Sort a list.\n3, 1, 2"  # the evolved text folds it, the record does not


def test_limit_and_field(tmp_path):
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(5)))
    got = read_seeds(tmp_path / "s.jsonl", 2, field="prompt")
    assert [s.instruction for s in got] == ["q0", "q1"]


@pytest.mark.parametrize("text, where, what", [
    ('{"instruction": "a"}\n{"instruction": ""}\n', ":2:", "is empty"),
    ('{"instruction": "a"}\n\n{"input": "x"}\n', ":3:", "missing field 'instruction'"),
    ('{"instruction": "a"}\n{"instruction": "b", "input": 3}\n', ":2:", "'input' must be a string"),
    ('{"instruction": "a"}\n{"instruction": "b"\n', ":2:", "invalid JSON"),
    ('{"instruction": "a", "id": "x"}\n{"instruction": "b", "id": "x"}\n', ":2:", "duplicate seed id 'x'"),
    ('[\n {"instruction": "a"},\n 7\n]\n', ":3:", "expected a JSON object"),
    ("\n\n", "", "no seed instructions"),
])
def test_bad_records_name_file_and_line(tmp_path, text, where, what):
    path = tmp_path / ("s.json" if text.startswith("[") else "s.jsonl")
    path.write_text(text)
    with pytest.raises(DataError) as e:
        read_seeds(path)
    msg = str(e.value)
    assert str(path) + where in msg and what in msg and "\n" not in msg, msg


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(DataError, match="seed file not found"):
        read_seeds(tmp_path / "nope.jsonl")


def test_the_bundled_seeds_are_the_env_and_generate_seeds():
    seeds = read_seeds()
    assert len(seeds) == 150 and len({s.id for s in seeds}) == 150
    assert sum(bool(s.input) for s in seeds) == 18 and len({s.domain for s in seeds}) == 20
    texts, domains = read_seed_records()  # the token-edit env's default: the instruction, input kept apart
    assert texts == [s.instruction for s in seeds] and domains == [s.domain for s in seeds]


def test_check_seed_file_names_the_missing_file(tmp_path):
    """A config's seed file that is not there is one line naming the key and the path; None passes."""
    missing = tmp_path / "alpaca_data.json"
    with pytest.raises(DataError) as e:
        check_seed_file(missing)
    msg = str(e.value)
    assert msg.startswith("seeds: ") and str(missing) in msg and "\n" not in msg, msg
    check_seed_file(None)
    missing.write_text("[]")
    check_seed_file(missing)
