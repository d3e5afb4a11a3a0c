"""Batches: deterministic from the seed, exact resume from the saved position, multi-process split,
remainder policy, DataConfig validation and the file -> batches path."""

import json

import numpy as np
import pytest
from helpers import make_tokenizer
from helpers import rng as seeded_rng

from teams_rl_jax import config as cfglib
from teams_rl_jax.data import BatchIterator, DataConfig, Example, make_batch_iterator, write_jsonl
from teams_rl_jax.data.packing import KEYS
from teams_rl_jax.errors import CheckpointError, ConfigError, DataError


def _seqs(n, rng=None):
    """Sequences whose first token is their index, so batches tell which examples they hold."""
    rng = rng or seeded_rng(1000 + n, "seqs")
    out = []
    for i in range(n):
        k = int(rng.integers(3, 14))
        ids = np.concatenate([[i], rng.integers(0, 50, k - 1)]).astype(np.int32)
        out.append((ids, (np.arange(k) > 0).astype(np.int32)))
    return out


def _examples_in(batch):
    """Example indices in a batch (first token of each segment)."""
    seg = batch["segment_ids"]
    starts = (seg > 0) & (batch["positions"] == 0)
    return batch["input_ids"][starts].tolist()


def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in KEYS)


@pytest.mark.parametrize("pack", [True, False])
def test_deterministic_from_seed_and_epochs_reshuffle(pack):
    seqs = _seqs(50)
    make = lambda seed: BatchIterator(seqs, global_batch=4, seq_len=32, seed=seed, pack=pack)  # noqa: E731
    a, b = make(7), make(7)
    steps = a.steps_per_epoch(0)
    first = [next(a) for _ in range(2 * steps + 3)]  # crosses two epoch boundaries
    assert all(_same(x, next(b)) for x in first)
    for x in first:
        assert set(x) == set(KEYS) and all(v.dtype == np.int32 and v.shape == (4, 32) for v in x.values())
    epoch0 = [e for x in first[:steps] for e in _examples_in(x)]
    epoch1 = [e for x in first[steps:steps + b.steps_per_epoch(1)] for e in _examples_in(x)]
    assert len(set(epoch0)) == len(epoch0) and len(set(epoch1)) == len(epoch1)  # no example twice in an epoch
    assert epoch0 != epoch1  # reshuffled
    assert _examples_in(next(make(8))) != _examples_in(first[0])  # another seed, another order
    c = BatchIterator(seqs, global_batch=4, seq_len=32, seed=7, pack=pack, shuffle=False)
    assert _examples_in(next(c))[:2] == [0, 1]  # file order


def test_resume_from_state_gives_identical_batches():
    seqs = _seqs(60)
    a = BatchIterator(seqs, global_batch=4, seq_len=32, seed=3)
    n = a.steps_per_epoch(0)
    for k in (0, 1, n - 1, n, n + 2):  # start, middle, last step of an epoch, epoch boundary, next epoch
        ref = BatchIterator(seqs, global_batch=4, seq_len=32, seed=3)
        [next(ref) for _ in range(k)]
        state = json.loads(json.dumps(ref.state()))  # as stored in a checkpoint
        resumed = BatchIterator(seqs, global_batch=4, seq_len=32, seed=3)
        resumed.restore(state)
        for _ in range(n + 1):
            assert _same(next(ref), next(resumed))
    s = a.state()
    assert set(s) >= {"epoch", "step"} and s["epoch"] == 0 and s["step"] == 0
    a.restore({"epoch": 2, "step": 1})  # an older position without the fingerprint still restores
    assert a.state()["epoch"] == 2
    other = BatchIterator(_seqs(59), global_batch=4, seq_len=32, seed=3)
    with pytest.raises(CheckpointError, match="saved with num_sequences=60 but the data now has num_sequences=59"):
        other.restore(s)
    with pytest.raises(CheckpointError, match="saved with seed=3"):
        BatchIterator(seqs, global_batch=4, seq_len=32, seed=4).restore(s)
    with pytest.raises(CheckpointError, match="integer 'epoch' and 'step'"):
        a.restore({"epoch": 1})


@pytest.mark.parametrize("n_proc", [2, 4])
@pytest.mark.parametrize("pack", [True, False])
def test_process_split_covers_global_batch_exactly_once(n_proc, pack):
    seqs = _seqs(70)
    full = BatchIterator(seqs, global_batch=8, seq_len=32, seed=1, pack=pack)
    parts = [BatchIterator(seqs, global_batch=8, seq_len=32, seed=1, pack=pack, process_index=p, process_count=n_proc)
             for p in range(n_proc)]
    for _ in range(full.steps_per_epoch(0) + 2):
        want = next(full)
        got = [next(p) for p in parts]
        assert all(g["input_ids"].shape == (8 // n_proc, 32) for g in got)
        # contiguous slices in process order make up the global batch
        assert _same({k: np.concatenate([g[k] for g in got]) for k in KEYS}, want)
        ex = [e for g in got for e in _examples_in(g)]
        assert sorted(ex) == sorted(_examples_in(want)) and len(set(ex)) == len(ex)
    assert len({p.steps_per_epoch(0) for p in parts}) == 1


def test_remainder_policy():
    seqs = _seqs(10)  # unpacked: 10 rows, batches of 4
    drop = BatchIterator(seqs, global_batch=4, seq_len=16, pack=False, seed=0)
    keep = BatchIterator(seqs, global_batch=4, seq_len=16, pack=False, seed=0, drop_remainder=False)
    assert drop.steps_per_epoch(0) == 2 and keep.steps_per_epoch(0) == 3
    batches = [next(keep) for _ in range(3)]
    assert sorted(e for b in batches for e in _examples_in(b)) == list(range(10))  # every example once
    last = batches[-1]
    assert (last["segment_ids"][2:] == 0).all() and (last["loss_mask"][2:] == 0).all()  # two padding rows
    assert next(keep)["input_ids"].shape == (4, 16) and keep.state()["epoch"] == 1
    with pytest.raises(DataError, match="fewer than one global batch of 16"):
        BatchIterator(seqs, global_batch=16, seq_len=16, pack=False)
    assert BatchIterator(seqs, global_batch=16, seq_len=16, pack=False, drop_remainder=False).steps_per_epoch(0) == 1
    with pytest.raises(ConfigError, match="not divisible by 3 processes"):
        BatchIterator(seqs, global_batch=4, seq_len=16, process_count=3)
    with pytest.raises(DataError, match="no sequences"):
        BatchIterator([], global_batch=4, seq_len=16)


def test_data_config_validation():
    cfg = cfglib.from_dict(DataConfig, {"path": "x.jsonl", "format": "sharegpt", "template": "vicuna",
                                        "max_seq_len": 64, "shuffle_seed": 3})
    assert cfg.max_seq_len == 64 and cfglib.to_dict(cfg)["format"] == "sharegpt"
    for bad, msg in [({"format": "csv"}, r"format: expected one of"), ({"max_seq_len": 4}, "max_seq_len must be >= 8"),
                     ({"min_response_tokens": 0}, "min_response_tokens"), ({"pack_window": 0}, "pack_window"),
                     ({"format": "tfds"}, "format 'tfds' needs an explicit path"), ({"shuffle_sed": 1}, "unknown"),
                     ({"pack": "yes"}, "expected true/false")]:
        with pytest.raises(ConfigError, match=msg):
            cfglib.from_dict(DataConfig, bad)
    with pytest.raises(ConfigError, match="template: expected one of"):
        DataConfig(template="chatml").validate()


def test_file_to_batches(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    rng = seeded_rng(0)
    words = "the sea sun moon poem list three items explain why blue sky answer yes no".split()
    exs = [Example(f"Write about {' '.join(rng.choice(words, 3))}.", " ".join(rng.choice(words, int(k))))
           for k in rng.integers(2, 30, 40)]
    write_jsonl(tmp_path / "d.jsonl", exs)
    cfg = DataConfig(path=str(tmp_path / "d.jsonl"), max_seq_len=128, shuffle_seed=5)
    logs = []
    it, stats = make_batch_iterator(cfg, tok, global_batch=2, log=logs.append)
    assert stats.kept == 40 and "40/40 examples kept" in logs[0]
    batch = next(it)
    assert batch["input_ids"].shape == (2, 128)
    assert (batch["input_ids"][batch["positions"] == 0] == tok.bos_token_id).sum() >= 2
    it2, _ = make_batch_iterator(cfg, tok, global_batch=2, process_index=1, process_count=2)
    assert _same({k: v[1:] for k, v in batch.items()}, next(it2))
    with pytest.raises(ConfigError, match="'auto'"):
        make_batch_iterator(DataConfig(), tok, global_batch=2)
