"""Data path: readers (errors name file:line), templates, loss masks, truncation, packing, batches."""

import json
from pathlib import Path

import numpy as np
import pytest

from teams_rl_jax.data import (BatchIterator, Example, format_alpaca, pack_rows, read_dataset,
                               segment_attention_mask, tokenize_dataset, tokenize_example, unpacked_rows)
from teams_rl_jax.data.tokenizer import build_word_tokenizer
from teams_rl_jax.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "teams_rl_evolved_alpaca.jsonl"


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_errors_name_file_and_line(tmp_path):
    ok = json.dumps({"instruction": "a", "output": "b"})
    p = _write(tmp_path / "d.jsonl", [ok, ok, '{"instruction": "x", "output": 3}'])
    with pytest.raises(DataError, match=r"d\.jsonl:3: field 'output' must be a string"):
        read_dataset(p)
    p = _write(tmp_path / "e.jsonl", [ok, "{not json"])
    with pytest.raises(DataError, match=r"e\.jsonl:2: invalid JSON"):
        read_dataset(p)
    p = _write(tmp_path / "f.jsonl", [ok, json.dumps({"instruction": "x"})])
    with pytest.raises(DataError, match=r"f\.jsonl:2: missing field 'output'"):
        read_dataset(p)
    p = _write(tmp_path / "g.jsonl", [""])
    with pytest.raises(DataError, match="empty"):
        read_dataset(p)
    with pytest.raises(DataError, match="not found"):
        read_dataset(tmp_path / "nope.jsonl")


def test_alpaca_json_and_sharegpt(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"instruction": "i1", "input": "x", "output": "o1"}, {"instruction": "i2", "output": "o2"}]))
    exs = read_dataset(p)
    assert [e.instruction for e in exs] == ["i1", "i2"] and exs[0].input == "x"
    conv = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                              {"from": "human", "value": "more"}, {"from": "gpt", "value": "sure"}]}
    p = _write(tmp_path / "s.jsonl", [json.dumps(conv)])
    exs = read_dataset(p)
    assert len(exs) == 2 and exs[1].history == (("hi", "hello"),) and exs[1].output == "sure"
    bad = {"conversations": [{"from": "gpt", "value": "hello"}]}
    p = _write(tmp_path / "t.jsonl", [json.dumps(conv), json.dumps(bad)])
    with pytest.raises(DataError, match=r"t\.jsonl:2: turn 0: assistant turn without a user turn"):
        read_dataset(p)


def test_alpaca_template_is_exact():
    assert format_alpaca("Do X.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nDo X.\n\n### Response:\n")
    assert "### Input:\nctx\n\n### Response:\n" in format_alpaca("Do X.", "ctx")


@pytest.fixture(scope="module")
def tok():
    words = "write a short poem about the sea sun moon answer is here yes no explain why please list three items".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 12)) for _ in range(50)] + [format_alpaca("x", "y")]
    return build_word_tokenizer(texts, 500)


def test_loss_mask_only_on_response_and_eos(tok):
    ex = Example("write a poem", "the sea is here")
    ids, mask, status = tokenize_example(ex, tok, "alpaca", 128)
    assert status == "kept" and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    n_resp = len(tok("the sea is here", add_special_tokens=False)["input_ids"]) + 1
    assert mask.sum() == n_resp and (mask[-n_resp:] == 1).all() and (mask[:-n_resp] == 0).all()


def test_truncation_policy_counts(tok):
    exs = [Example("write a poem", "the sea " * 40), Example("write " * 200, "yes"), Example("list", "no")]
    seqs, stats = tokenize_dataset(exs, tok, "alpaca", 64)
    assert (stats.examples, stats.kept, stats.truncated, stats.dropped) == (3, 2, 1, 1)
    assert all(len(ids) <= 64 for ids, _ in seqs)
    assert seqs[0][0][-1] != tok.eos_token_id  # a cut answer does not end with EOS


def _random_seqs(rng, n, lo=3, hi=20):
    out = []
    for _ in range(n):
        k = int(rng.integers(lo, hi))
        ids = rng.integers(4, 100, size=k).astype(np.int32)
        mask = (np.arange(k) >= rng.integers(1, k)).astype(np.int32)
        out.append((ids, mask))
    return out


def test_packing_preserves_each_example_and_never_crosses_segments():
    rng = np.random.default_rng()
    seqs = _random_seqs(rng, 40)
    packed, plain = pack_rows(seqs, 32), unpacked_rows(seqs, 32)
    assert len(packed["input_ids"]) < len(plain["input_ids"])
    found = []
    for r in range(len(packed["input_ids"])):
        seg = packed["segment_ids"][r]
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            assert (np.diff(idx) == 1).all()  # contiguous
            assert (packed["positions"][r, idx] == np.arange(len(idx))).all()
            found.append((packed["input_ids"][r, idx].tolist(), packed["loss_mask"][r, idx].tolist()))
    assert sorted(found) == sorted((i.tolist(), m.tolist()) for i, m in seqs)  # every example once, intact
    att = segment_attention_mask(packed["segment_ids"])
    seg = packed["segment_ids"]
    q, k = np.nonzero(att[0])
    assert (seg[0, q] == seg[0, k]).all() and (k <= q).all() and (seg[0, k] > 0).all()
    assert packed["loss_mask"].sum() == plain["loss_mask"].sum()


def test_batches_deterministic_resumable_and_split_across_processes():
    rng = np.random.default_rng()
    seqs = _random_seqs(rng, 60)
    a = BatchIterator(seqs, global_batch=4, seq_len=32, seed=7)
    first = [next(a) for _ in range(9)]  # crosses an epoch boundary
    b = BatchIterator(seqs, global_batch=4, seq_len=32, seed=7)
    for x, y in zip(first, (next(b) for _ in range(9))):
        assert all((x[k] == y[k]).all() for k in x)
    # resume from a saved state
    c = BatchIterator(seqs, global_batch=4, seq_len=32, seed=7)
    [next(c) for _ in range(5)]
    d = BatchIterator(seqs, global_batch=4, seq_len=32, seed=7)
    d.restore(c.state())
    for _ in range(4):
        x, y = next(c), next(d)
        assert all((x[k] == y[k]).all() for k in x)
    # another seed, another order
    e = BatchIterator(seqs, global_batch=4, seq_len=32, seed=8)
    assert not all((next(e)["input_ids"] == first[0]["input_ids"]).all() for _ in range(1))
    # two processes together give exactly the global batch
    parts = [BatchIterator(seqs, global_batch=4, seq_len=32, seed=7, process_index=p, process_count=2)
             for p in range(2)]
    for x in first[:3]:
        got = [next(p) for p in parts]
        assert (np.concatenate([g["input_ids"] for g in got]) == x["input_ids"]).all()


@pytest.mark.skipif(not SHARED.is_file(), reason="../shared/data not present (only in the dev workspace)")
def test_real_evolved_instructions_tokenize_and_pack():
    recs = [json.loads(l) for l in SHARED.read_text().splitlines() if l.strip()]
    exs = [Example(r["instruction"], r["seed_output"], r.get("input", "")) for r in recs[:200]]
    tok = build_word_tokenizer([e.instruction + " " + e.output for e in exs] + [format_alpaca("x", "y")], 3000)
    seqs, stats = tokenize_dataset(exs, tok, "alpaca", 256)
    assert stats.kept + stats.dropped == 200 and stats.loss_tokens > 0
    rows = pack_rows(seqs, 256)
    fill = (rows["segment_ids"] > 0).mean()
    assert fill > 0.88, fill
