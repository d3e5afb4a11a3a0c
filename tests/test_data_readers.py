"""Dataset readers: Alpaca JSON list, Alpaca JSONL, ShareGPT; every error names file:line and the fault."""

import json
from pathlib import Path

import pytest

from teams_rl_jax.data import Example, read_alpaca_json, read_dataset, read_jsonl, read_sharegpt, write_jsonl
from teams_rl_jax.data.readers import detect_format
from teams_rl_jax.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "teams_rl_evolved_alpaca.jsonl"
OK = {"instruction": "Name a color.", "input": "", "output": "Red."}


def _lines(path, objs):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


@pytest.mark.parametrize("bad, message", [
    ("{not json", r"invalid JSON"),
    ({"output": "x"}, r"missing field 'instruction'"),
    ({"instruction": "x"}, r"missing field 'output'"),
    ({"instruction": "x", "output": 3}, r"field 'output' must be a string, got int"),
    ({"instruction": ["x"], "output": "y"}, r"field 'instruction' must be a string, got list"),
    ({"instruction": "x", "input": 5, "output": "y"}, r"field 'input' must be a string, got int"),
    ({"instruction": "  ", "output": "y"}, r"field 'instruction' is empty"),
    ({"instruction": "x", "output": ""}, r"field 'output' is empty"),
    ({"instruction": "x", "output": "y", "meta": [1]}, r"field 'meta' must be an object"),
    ("[1, 2]", r"expected a JSON object, got list"),
])
def test_jsonl_bad_line_names_file_line_and_fault(tmp_path, bad, message):
    # blank line 2 must not shift the numbering: the bad record is on line 4
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(OK) + "\n\n" + json.dumps(OK) + "\n" + (bad if isinstance(bad, str) else json.dumps(bad))
                 + "\n")
    with pytest.raises(DataError, match=rf"d\.jsonl:4: {message}"):
        read_dataset(p)
    with pytest.raises(DataError, match=rf"d\.jsonl:4: {message}"):
        read_dataset(p, "alpaca_jsonl")


def test_empty_missing_and_unknown(tmp_path):
    for name, text in [("e.jsonl", ""), ("b.jsonl", "\n  \n"), ("l.json", "[ ]"), ("s.jsonl", "")]:
        p = tmp_path / name
        p.write_text(text)
        with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')}: dataset is empty"):
            read_dataset(p)
    with pytest.raises(DataError, match="dataset is empty"):
        read_dataset(tmp_path / "s.jsonl", "sharegpt")
    with pytest.raises(DataError, match=r"dataset file not found: .*nope\.jsonl"):
        read_dataset(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="unknown dataset format 'csv'"):
        read_dataset(tmp_path / "e.jsonl", "csv")


def test_alpaca_json_list_errors_name_the_record_line(tmp_path):
    recs = [OK, {"instruction": "Add.", "input": "2+2", "output": "4"}, {"instruction": "x", "output": 7}]
    p = tmp_path / "a.json"
    p.write_text(json.dumps(recs, indent=2))  # one key per line: record 3 starts on line 12
    start = p.read_text().splitlines().index("  {", 10) + 1
    with pytest.raises(DataError, match=rf"a\.json:{start}: field 'output' must be a string"):
        read_dataset(p)
    p.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "output": }\n]')
    with pytest.raises(DataError, match=r"a\.json:3: invalid JSON"):
        read_alpaca_json(p)
    p.write_text('[\n {"instruction": "a", "output": "b"}\n {"instruction": "c", "output": "d"}]')
    with pytest.raises(DataError, match=r"a\.json:3: invalid JSON \(expected ',' or '\]'"):
        read_alpaca_json(p)
    p.write_text('{"instruction": "a", "output": "b"}')
    with pytest.raises(DataError, match=r"a\.json:1: expected a JSON list"):
        read_alpaca_json(p)
    p.write_text('[{"instruction": "a", "output": "b"}] []')
    with pytest.raises(DataError, match=r"extra data after the list"):
        read_alpaca_json(p)


def test_alpaca_json_reads_records(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"instruction": "i1", "input": "x", "output": "o1", "extra": 1},
                             {"instruction": "i2", "output": "o2"},
                             {"instruction": "i3", "input": None, "output": "o3"}]))
    assert detect_format(p) == "alpaca"
    assert read_dataset(p) == [Example("i1", "o1", "x"), Example("i2", "o2"), Example("i3", "o3")]


def test_generated_records_keep_meta_and_round_trip(tmp_path):
    meta = {"seed_id": 3, "ops": ["deepening", "breadth"], "step": 2,
            "queries": {"instructor": 2, "reviewer": 2, "expert": 1}}
    exs = [Example("Evolved instruction", "Expert answer", "ctx", meta=meta), Example("Plain", "Answer")]
    p = tmp_path / "run" / "data" / "generated.jsonl"
    assert write_jsonl(p, exs) == 2
    assert json.loads(p.read_text().splitlines()[0]) == {"instruction": "Evolved instruction", "input": "ctx",
                                                         "output": "Expert answer", "meta": meta}
    assert detect_format(p) == "alpaca_jsonl"
    assert read_dataset(p) == exs == read_jsonl(p) == read_dataset(p, "jsonl")
    write_jsonl(p, [{"instruction": "third", "output": "x"}], append=True)
    assert len(read_dataset(p)) == 3


def _conv(*turns, **extra):
    return {"conversations": [{"from": r, "value": v} for r, v in turns], **extra}


def test_sharegpt_conversations(tmp_path):
    conv = _conv(("system", "Be brief."), ("human", "hi"), ("gpt", "hello"), ("human", "more"), ("gpt", "sure"),
                 ("human", "unanswered"), meta={"id": "c1"})
    msgs = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    p = _lines(tmp_path / "s.jsonl", [conv, msgs])
    assert detect_format(p) == "sharegpt"
    exs = read_dataset(p)
    assert exs[0] == Example("more", "sure", "", (("hi", "hello"),), {"id": "c1"}, "Be brief.")
    assert exs[1] == Example("q", "a")
    # a JSON list of conversations, and a write -> read round trip through conversation records
    q = tmp_path / "s.json"
    q.write_text(json.dumps([conv, msgs]))
    assert detect_format(q) == "sharegpt" and read_sharegpt(q) == exs
    r = tmp_path / "w.jsonl"
    write_jsonl(r, exs)  # one chat example makes every record a conversation record
    assert read_dataset(r) == exs and "conversations" in r.read_text().splitlines()[1]


@pytest.mark.parametrize("conv, message", [
    (_conv(("gpt", "hello")), r"turn 0: assistant turn without a user turn"),
    (_conv(("human", "a"), ("human", "b")), r"turn 1: two user turns in a row"),
    (_conv(("human", "a"), ("robot", "b")), r"turn 1: unknown role 'robot'"),
    (_conv(("human", "a"), ("gpt", "b"), ("system", "s")), r"turn 2: a system turn must come first"),
    (_conv(("human", "a"), ("gpt", " ")), r"turn 1: empty assistant reply"),
    (_conv(("human", "a")), r"no user/assistant turn pair"),
    ({"conversations": []}, r"missing or empty 'conversations' list"),
    ({"conversations": [{"from": "human", "value": 1}]}, r"turn 0 needs a string 'value'"),
    ({"conversations": ["hi"]}, r"turn 0 must be an object"),
])
def test_sharegpt_errors_name_file_line(tmp_path, conv, message):
    p = _lines(tmp_path / "t.jsonl", [_conv(("human", "a"), ("gpt", "b")), conv])
    with pytest.raises(DataError, match=rf"t\.jsonl:2: {message}"):
        read_dataset(p, "sharegpt")


@pytest.mark.skipif(not SHARED.is_file(), reason=f"shared data file {SHARED} not present (dev workspace only)")
def test_real_evolved_alpaca_file(tmp_path):
    recs = [json.loads(line) for line in SHARED.read_text().splitlines() if line.strip()]
    p = tmp_path / "evolved.jsonl"
    write_jsonl(p, [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["seed_output"],
                     "meta": {"trajectory": r["trajectory"], "step": r["step"]}} for r in recs])
    exs = read_dataset(p)
    assert len(exs) == len(recs) > 1000
    assert exs[5].meta == {"trajectory": recs[5]["trajectory"], "step": recs[5]["step"]}
    with pytest.raises(DataError, match=r"evolved_alpaca\.jsonl:1: missing field 'output'"):
        read_dataset(SHARED)  # its answers are under 'seed_output'
