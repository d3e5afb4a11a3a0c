"""Packing: every example intact in one segment, positions restart, attention never crosses segments,
and a float64 reference model gives the same logits and summed loss packed and unpacked."""

import importlib
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import make_tokenizer
from helpers import rng as seeded_rng

from teams_rl_jax.data import Example, tokenize_dataset
from teams_rl_jax.data import empty_rows, fill_ratio, first_fit, pack_rows, segment_attention_mask, unpacked_rows
from teams_rl_jax.models import init

# The model's own mask function, reached as a module attribute (as the model calls it), so that
# ../shared/tools/mutate.py teams_rl_jax.models.llama:attention_mask reaches these tests.
llama = importlib.import_module("teams_rl_jax.models.llama")


def model_mask(segment_ids: np.ndarray, window=None) -> np.ndarray:
    """``[B, T, T]`` boolean mask from the model's ``attention_mask`` (no cache: slots are 0..T-1)."""
    seg = jax.numpy.asarray(segment_ids, jax.numpy.int32)
    slots = jax.numpy.arange(seg.shape[1])
    return np.asarray(llama.attention_mask(seg, seg, slots, slots, window))[:, 0]


def _random_seqs(rng, n, lo=2, hi=30, vocab=50):
    out = []
    for _ in range(n):
        k = int(rng.integers(lo, hi))
        ids = rng.integers(4, vocab, size=k).astype(np.int32)
        mask = (np.arange(k) >= rng.integers(1, k)).astype(np.int32)  # prompt then response
        out.append((ids, mask))
    return out


def _segments(rows):
    """(row, segment id, token indices) for every segment of every row."""
    for r, seg in enumerate(rows["segment_ids"]):
        for s in np.unique(seg[seg > 0]):
            yield r, int(s), np.flatnonzero(seg == s)


def test_packed_rows_hold_each_example_once_intact():
    """Catches: an example split, dropped or duplicated by packing, positions not restarting, padding
    carrying loss or tokens."""
    rng = seeded_rng(40)
    seqs = _random_seqs(rng, 60)
    T, pad = 40, 7
    packed, plain = pack_rows(seqs, T, pad_id=pad), unpacked_rows(seqs, T, pad_id=pad)
    assert all(v.dtype == np.int32 and v.shape[1] == T for v in [*packed.values(), *plain.values()])
    assert len(packed["input_ids"]) < len(plain["input_ids"]) == len(seqs)
    found = []
    for r, s, idx in _segments(packed):
        assert (np.diff(idx) == 1).all()  # contiguous
        assert (packed["positions"][r, idx] == np.arange(len(idx))).all()  # restart at 0
        found.append((packed["input_ids"][r, idx].tolist(), packed["loss_mask"][r, idx].tolist()))
    key = lambda x: (x[0], x[1])  # noqa: E731
    assert sorted(found, key=key) == sorted(((i.tolist(), m.tolist()) for i, m in seqs), key=key)
    for rows in (packed, plain):
        seg = rows["segment_ids"]
        for r in range(len(seg)):  # segment ids 1, 2, ... along the row, padding only at the end
            nz = seg[r][seg[r] > 0]
            assert (np.diff(nz) >= 0).all() and set(nz) == set(range(1, nz.max() + 1))
            assert (seg[r, len(nz):] == 0).all()
        padding = seg == 0
        assert (rows["input_ids"][padding] == pad).all() and (rows["loss_mask"][padding] == 0).all()
        assert (rows["positions"][padding] == 0).all()
    # unpacked row i is example i, and each packed segment equals its unpacked row's prefix
    for i, (ids, mask) in enumerate(seqs):
        assert (plain["input_ids"][i, :len(ids)] == ids).all() and (plain["loss_mask"][i, :len(ids)] == mask).all()
    assert packed["loss_mask"].sum() == plain["loss_mask"].sum() == sum(int(m.sum()) for _, m in seqs)
    assert fill_ratio(packed) > fill_ratio(plain)


def test_attention_mask_never_crosses_segments():
    """Property test of the MODEL's mask (``models.llama.attention_mask``) on packed rows.

    Catches: attention across segments of a packed row, attention to padding, a non-causal mask,
    a sliding window off by one, and the data package's numpy mirror drifting from the model's mask.
    """
    rng = seeded_rng(41)
    seqs = _random_seqs(rng, 30)
    packed = pack_rows(seqs, 48)
    seg = packed["segment_ids"]
    att = model_mask(seg)
    assert att.shape == (len(seg), 48, 48) and att.dtype == bool
    b, q, k = np.nonzero(att)
    assert (seg[b, q] == seg[b, k]).all() and (k <= q).all() and (seg[b, k] > 0).all()
    # and it is exactly the block-diagonal of each example's own causal mask
    expect = np.zeros_like(att)
    n_segments = 0
    for r, s, idx in _segments(packed):
        expect[r][np.ix_(idx, idx)] = np.tril(np.ones((len(idx), len(idx)), bool))
        n_segments += 1
    assert n_segments > len(seg)  # rows really hold several examples
    assert (att == expect).all()
    assert (segment_attention_mask(seg) == att).all()  # the numpy mirror used by the data tools agrees
    # sliding window w: query q sees keys q-w+1 .. q of its own segment
    win = model_mask(seg, window=3)
    assert (win == (expect & (np.subtract.outer(np.arange(48), np.arange(48)) < 3)[None])).all()


def test_packed_logits_equal_unpacked_through_the_model():
    """The real model on packed rows gives each example the logits it gets alone in its own row.

    Catches: the model's mask or positions letting a segment see (or be offset by) the previous one.
    """
    cfg = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
    lm = init(cfg, jax.random.key(42))
    seqs = _random_seqs(seeded_rng(43), 10, lo=3, hi=14, vocab=64)
    packed, plain = pack_rows(seqs, 32), unpacked_rows(seqs, 32)
    assert len(packed["input_ids"]) < len(seqs)
    apply = jax.jit(lm.apply)
    lp = np.asarray(apply(lm.params, packed["input_ids"], packed["segment_ids"], packed["positions"]))
    lu = np.asarray(apply(lm.params, plain["input_ids"], plain["segment_ids"], plain["positions"]))
    by_content = {}
    for r, s, idx in _segments(packed):
        by_content.setdefault(packed["input_ids"][r, idx].tobytes(), []).append(lp[r, idx])
    worst = 0.0
    for i, (ids, _) in enumerate(seqs):
        got, want = by_content[ids.tobytes()].pop(), lu[i, :len(ids)]
        worst = max(worst, float(np.abs(got - want).max()))
    assert worst <= 1e-5, worst
    # control: one segment per row (plain causal attention over the packed row) changes the logits
    leak = np.asarray(apply(lm.params, packed["input_ids"], (packed["segment_ids"] > 0).astype(np.int32),
                            packed["positions"]))
    later = (packed["segment_ids"] > 1)  # tokens of the second and later segments of a row
    assert np.abs(leak[later] - lp[later]).max() > 1e-2


def _reference_loss(rows, params):
    """Float64 one-layer attention LM that respects segment ids; returns (summed loss, logits [B, T, V]).

    Loss convention of the SFT step: target t+1 counts when its loss_mask is 1 and it is in t's segment.
    """
    E, P, Wq, Wk, Wv, Wo = params
    ids, seg, pos = rows["input_ids"], rows["segment_ids"], rows["positions"]
    h = E[ids] + P[pos]
    q, k, v = h @ Wq, h @ Wk, h @ Wv
    scores = np.einsum("btd,bsd->bts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(segment_attention_mask(seg), scores, -1e30)
    a = np.exp(scores - scores.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    logits = (np.einsum("bts,bsd->btd", a, v) + h) @ Wo
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    tgt = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
    w = rows["loss_mask"][:, 1:] * (seg[:, 1:] == seg[:, :-1])
    return -(tgt * w).sum(), logits


def test_packing_keeps_logits_and_summed_loss():
    """Float64 reference LM (its mask is ``segment_attention_mask``): packed == unpacked logits and summed loss.

    Catches: a loss target counted across a segment boundary, a layout that changes an example's tokens.
    """
    rng = seeded_rng(44)
    V, D, T = 50, 16, 48
    params = [rng.normal(size=s) for s in [(V, D), (T, D), (D, D), (D, D), (D, D), (D, V)]]
    seqs = _random_seqs(rng, 24, vocab=V)
    packed, plain = pack_rows(seqs, T), unpacked_rows(seqs, T)
    loss_p, logits_p = _reference_loss(packed, params)
    loss_u, logits_u = _reference_loss(plain, params)
    np.testing.assert_allclose(loss_p, loss_u, rtol=1e-12)
    # each example's logits are the same wherever it sits
    by_content = {}
    for r, s, idx in _segments(packed):
        by_content.setdefault(packed["input_ids"][r, idx].tobytes(), []).append(logits_p[r, idx])
    for i, (ids, _) in enumerate(seqs):
        got = by_content[ids.tobytes()].pop()
        np.testing.assert_allclose(got, logits_u[i, :len(ids)], rtol=1e-12, atol=1e-12)
    # control: ignoring segment ids (plain causal attention, running positions) changes the packed loss
    leaky = dict(packed, segment_ids=(packed["segment_ids"] > 0).astype(np.int32),
                 positions=np.broadcast_to(np.arange(T, dtype=np.int32), packed["positions"].shape))
    leaky["loss_mask"] = packed["loss_mask"] * np.concatenate(  # keep the segment-boundary targets excluded
        [np.ones((len(packed["loss_mask"]), 1), np.int32),
         (packed["segment_ids"][:, 1:] == packed["segment_ids"][:, :-1]).astype(np.int32)], 1)
    assert abs(_reference_loss(leaky, params)[0] - loss_u) > 1e-6 * abs(loss_u)


def test_first_fit_layout():
    row, off, n = first_fit([5, 6, 4, 1, 3], 10, window=64)
    assert n == 2 and row.tolist() == [0, 1, 0, 0, 1] and off.tolist() == [0, 0, 5, 9, 6]
    row, off, n = first_fit([5, 6, 4, 1, 3], 10, window=1)  # next-fit: only the newest row is open
    assert n == 3 and row.tolist() == [0, 1, 1, 2, 2] and off.tolist() == [0, 0, 6, 0, 1]
    with pytest.raises(ValueError, match="sequence 1 has 11 tokens > row length 10"):
        first_fit([3, 11], 10)
    with pytest.raises(ValueError, match="sequence 0 has 11 tokens"):
        unpacked_rows([(np.ones(11, np.int32), np.ones(11, np.int32))], 10)
    assert pack_rows([], 8)["input_ids"].shape == (0, 8)
    e = empty_rows(2, 5, pad_id=9)
    assert (e["input_ids"] == 9).all() and not e["segment_ids"].any() and not e["loss_mask"].any()


def test_pack_rows_is_deterministic_and_fast_enough():
    rng = seeded_rng(0)
    seqs = _random_seqs(rng, 5000, hi=200)
    a, b = pack_rows(seqs, 512), pack_rows(seqs, 512)
    assert all((a[k] == b[k]).all() for k in a)
    assert fill_ratio(a) > 0.95


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "teams_rl_evolved_alpaca.jsonl"


@pytest.mark.skipif(not SHARED.is_file(), reason=f"shared data file {SHARED} not present (dev workspace only)")
def test_real_evolved_instructions_tokenize_and_pack(tmp_path):
    recs = [json.loads(line) for line in SHARED.read_text().splitlines() if line.strip()][:600]
    exs = [Example(r["instruction"], r["seed_output"], r.get("input", "")) for r in recs]
    tok = make_tokenizer(tmp_path, [e.instruction + " " + e.input + " " + e.output for e in exs[:300]], 2000)
    seqs, stats = tokenize_dataset(exs, tok, "alpaca", 512)
    assert stats.kept + stats.dropped == 600 and stats.truncated > 0 and stats.loss_tokens > 0
    rows = pack_rows(seqs, 512)
    assert fill_ratio(rows) > 0.88, fill_ratio(rows)
    assert fill_ratio(pack_rows(seqs, 512, window=1)) < 0.8 < fill_ratio(rows)  # first-fit beats next-fit
