"""Continuous batching (``slot_engine`` + ``backends.continuous``) on tiny random checkpoints, float32.

A row must decode exactly as ``generation.generate`` decodes its prompt alone, whatever shares the slots
(neighbours of other prompt lengths and limits, admitted while it decodes, the cache growing under it);
the top-2 margin of every compared step is asserted, so a near-tie cannot pass by luck. A short request
must return while long ones are still decoding; sampled rows depend on their seed and index only; the
number of compiled programs is bounded whatever the mix of lengths and limits.

Mutations tried: caught: the per-row cache column replaced by column 0 (``slot_engine.decode`` ``col``);
the prompt's segment ids not written into the slot (``seg_row`` zeros); the per-request key ignored
(``keys`` zeroed: the sampled test); ``grow`` dropping the old columns; the attention window not
bucketed in ``ContinuousEngine._step`` (the program-bound test). Not caught, and equivalent: positions
and columns advanced for done rows too (a done row is reset when its slot is refilled); the rest of a
refilled row's segment ids left from the previous occupant (the per-row causal mask already hides
every column past the row's own write position).
"""

from __future__ import annotations

import collections
import threading
import time

import jax
import numpy as np
import pytest

import helpers
from helpers import rng as seeded_rng
from helpers import seed as record_seed
from hf_models import make_hf_model
from teams_rl_jax import generate, slot_engine
from teams_rl_jax.backends import FlaxBackend
from teams_rl_jax.models import load_pretrained

pytest.importorskip("torch")

_BUILT: dict = {}


SLOTS = 4  # one slot count for every test: they share the compiled programs


def _backend(tmp_path_factory, variant: str, slots: int = SLOTS) -> FlaxBackend:
    """A FlaxBackend over a tiny random ``variant`` (no EOS: rows run to their limits unless told)."""
    if variant not in _BUILT:
        tmp = tmp_path_factory.mktemp(f"cb_{variant}")
        tok = helpers.make_tokenizer(tmp / "tok", vocab_size=300)
        _, path = make_hf_model(tmp, variant, seed=record_seed(31 if variant == "llama3" else 32, f"{variant} weights"),
                                vocab_size=len(tok), initializer_range=0.15)
        _BUILT[variant] = (load_pretrained(path), tok)
    lm, tok = _BUILT[variant]
    return FlaxBackend.from_lm(lm, tok, role="t", max_batch=slots, eos_ids=(), chat=False)


def _alone(lm, ids, limit) -> list[int]:
    """Reference: ``generate`` on this prompt alone (batch 1, left-padded to 64 and run for 48 tokens, so one
    program serves every prompt; greedy without EOS, so the first ``limit`` tokens are the run's)."""
    ids_ = np.zeros((1, 64), np.int32)
    mask = np.zeros((1, 64), np.int32)
    ids_[0, 64 - len(ids):], mask[0, 64 - len(ids):] = ids, 1
    out = generate(lm, lm.params, ids_, mask, max_new_tokens=48, rng=jax.random.key(0))
    return [int(t) for t in np.asarray(out)[0, :limit]]


_APPLY: dict = {}  # one jitted forward per model


def _min_margin(lm, ids, new) -> float:
    """Smallest top1 - top2 logit gap over the steps that produced ``new`` (teacher-forced forward)."""
    seq = list(ids) + list(new)
    full = np.zeros((1, 128), np.int32)
    mask = np.zeros((1, 128), np.int32)
    full[0, :len(seq)], mask[0, :len(seq)] = seq, 1
    fwd = _APPLY.setdefault(id(lm), jax.jit(lm.apply))
    logits = np.asarray(fwd(lm.params, full, mask), np.float64)[0]
    steps = logits[len(ids) - 1:len(ids) - 1 + len(new)]
    top2 = np.sort(steps, -1)[:, -2:]
    return float((top2[:, 1] - top2[:, 0]).min())


@pytest.mark.parametrize("variant", ["llama3", "mistral"])
def test_greedy_rows_equal_generate_alone_whatever_shares_the_slots(tmp_path_factory, variant):
    """Four slots, seven requests in two waves: the second wave (longer prompts: the cache grows while the
    first wave's long row decodes) joins freed slots mid-run. Mistral's sliding window (4) is shorter than
    most prompts, so the window must act on each row's own columns."""
    be = _backend(tmp_path_factory, variant)
    lm = be.lm
    rng = seeded_rng(7 if variant == "llama3" else 18, f"{variant} prompts")
    V = lm.config.vocab_size
    wave1 = [(rng.integers(4, V, n).tolist(), lim) for n, lim in ((2, 12), (5, 3), (9, 20))]
    wave2 = [(rng.integers(4, V, n).tolist(), lim) for n, lim in ((33, 40), (17, 7), (3, 1), (12, 9))]
    f1 = be.submit_ids([p for p, _ in wave1], max_new_tokens=[m for _, m in wave1])
    f1[1].result(timeout=120)                       # the short row is out; the long ones are still decoding
    assert not f1[2].done()
    cache_before = be.engine._cache_len
    f2 = be.submit_ids([p for p, _ in wave2], max_new_tokens=[m for _, m in wave2])
    got = [f.result(timeout=300) for f in f1 + f2]
    assert be.engine._cache_len > cache_before, "the second wave should have grown the cache"
    for (ids, limit), out in zip(wave1 + wave2, got):
        want = _alone(lm, ids, limit)
        margin = _min_margin(lm, ids, want)
        # Slot layouts change only float32 summation order (logit differences ~1e-6): a 1e-4 gap cannot flip.
        assert margin > 1e-4, f"{variant}: near-tie (top-2 margin {margin:.2e}): pick another seed, do not loosen"
        assert list(out.token_ids) == want, (variant, len(ids), limit)
        assert out.finish_reason == "length"


def test_greedy_rows_stop_at_their_own_eos(tmp_path_factory):
    """With an EOS id the free runs produce, rows end at different steps; each equals its alone run cut
    at its first EOS, and the freed slots serve the queued rows."""
    be0 = _backend(tmp_path_factory, "llama3")
    lm = be0.lm
    rng = seeded_rng(9, "eos prompts")
    prompts = [rng.integers(4, lm.config.vocab_size, n).tolist() for n in (3, 7, 11, 4, 6, 9, 2)]
    free = [_alone(lm, p, 16) for p in prompts]
    counts: dict = {}
    for row in free:
        for t in set(row[1:]):
            counts[t] = counts.get(t, 0) + 1
    eos = max(counts, key=lambda t: (counts[t] < len(free), counts[t]))  # in some runs, not in all
    be = FlaxBackend.from_lm(lm, be0.tokenizer, role="t", max_batch=SLOTS, eos_ids=(eos,), chat=False)
    outs = be.generate_ids(prompts, max_new_tokens=16)
    stopped = 0
    for row, out in zip(free, outs):
        cut = row.index(eos) if eos in row else None
        assert list(out.token_ids) == (row if cut is None else row[:cut])
        assert out.finish_reason == ("length" if cut is None else "stop")
        stopped += cut is not None
    assert 0 < stopped < len(prompts)


def test_short_request_is_not_held_behind_long_ones(tmp_path_factory):
    """Three long rows decode in 3 of 4 slots; two short ones arrive, the second waits for the first's slot:
    both return while every long row is still decoding."""
    be = _backend(tmp_path_factory, "llama3")
    rng = seeded_rng(10, "hold prompts")
    p = [rng.integers(4, be.lm.config.vocab_size, n).tolist() for n in (6, 9, 3, 4, 5)]
    longs = be.submit_ids(p[:3], max_new_tokens=96)
    t0 = time.monotonic()
    while be.engine.decode_calls == 0 and time.monotonic() - t0 < 120:
        time.sleep(0.005)
    short_b, short_c = be.submit_ids(p[3:], max_new_tokens=4)  # c waits for b's slot
    assert len(short_c.result(timeout=120).token_ids) == 4
    assert short_b.done() and not any(f.done() for f in longs), "a short request waited for the long ones"
    assert all(len(f.result(timeout=300).token_ids) == 96 for f in longs)


def test_sampled_row_depends_on_its_seed_and_index_only(tmp_path_factory):
    be = _backend(tmp_path_factory, "llama3")
    rng = seeded_rng(11, "sample prompts")
    p = [rng.integers(4, be.lm.config.vocab_size, n).tolist() for n in (5, 13, 2)]
    seed = record_seed(1234, "sampling seed")
    alone = be.generate_ids([p[0]], max_new_tokens=12, temperature=0.9, seed=seed)[0]
    crowd = be.generate_ids(p, max_new_tokens=[12, 30, 5], temperature=0.9, seed=seed)[0]
    assert alone.token_ids == crowd.token_ids
    other = be.generate_ids([p[0]], max_new_tokens=12, temperature=0.9, seed=seed + 1)[0]
    assert other.token_ids != alone.token_ids


def test_host_picks_the_sampling_branch_of_the_live_rows(tmp_path_factory, monkeypatch):
    """``decode`` takes its sampling branch from the host (a device-side cond would sync the host on every
    step on a GPU): ``greedy`` while only greedy rows live, ``sample`` once a sampled row joins, ``filtered``
    once a top-p row joins. A sampled row (top_p 1) draws the same tokens in each branch as alone, and the
    top-p row the same as alone. Mutations caught: the branch taken from one row instead of all live rows;
    the branch fixed to ``filtered`` (no greedy-only call). Not caught, equivalent here: ``filtered``
    filtering the top_p-1 rows too (at top_p 1 the nucleus cut only drops tokens past a float32 cumulative
    mass of 1.0, none in this model's flat distribution)."""
    be = _backend(tmp_path_factory, "llama3")
    rng = seeded_rng(12, "branch prompts")
    p = [rng.integers(4, be.lm.config.vocab_size, n).tolist() for n in (5, 9, 3)]
    seed = record_seed(4321, "sampling seed")
    alone = be.generate_ids([p[0]], max_new_tokens=10, temperature=0.9, seed=seed)[0].token_ids
    alone_p = be.generate_ids([p[1]], max_new_tokens=10, temperature=0.9, top_p=0.6, seed=seed)[0].token_ids
    modes = []
    decode = slot_engine.decode

    def spy(*a, **kw):
        modes.append(kw["mode"])
        return decode(*a, **kw)

    monkeypatch.setattr(slot_engine, "decode", spy)
    calls = be.engine.decode_calls
    greedy = be.submit_ids([p[2]], max_new_tokens=120)[0]  # a long greedy neighbour
    t0 = time.monotonic()
    while be.engine.decode_calls == calls and time.monotonic() - t0 < 120:
        time.sleep(0.005)
    # Together: the top-p row (4 tokens) ends first, the sampled one (10) then decodes without it.
    crowd = be.submit_ids([p[0]], max_new_tokens=10, temperature=0.9, seed=seed)[0]
    crowd_p = be.submit_ids([p[1]], max_new_tokens=4, temperature=0.9, top_p=0.6, seed=seed)[0]
    assert crowd.result(timeout=120).token_ids == alone
    assert crowd_p.result(timeout=120).token_ids == alone_p[:4]
    assert len(greedy.result(timeout=300).token_ids) == 120
    first = {m: modes.index(m) for m in set(modes)}
    assert first.keys() == {"greedy", "sample", "filtered"} and first["greedy"] == 0, modes


def _from_four_threads(be, reqs) -> None:
    """Send ``(prompt ids, limit[, temperature, top_p])`` requests one at a time from each of 4 threads (a
    quarter each); raise the first failure."""
    errors = []

    def worker(part):
        try:
            for ids, lim, *sampling in part:  # optional (temperature, top_p)
                be.generate_ids([ids], max_new_tokens=lim, **dict(zip(("temperature", "top_p"), sampling)))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(reqs[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_compiled_programs_stay_bounded_under_any_mix(tmp_path_factory, monkeypatch):
    """2 x 32 requests from 4 threads with every prompt length in 1..100 and limit in 1..48 (the soak's mix
    that grew the server's memory: a program per max_tokens value): every program shape the engine asks
    for is a power-of-two bucket (recorded at the call, so thread timing cannot hide one), and the
    programs compiled stay within the bucket product."""
    be = _backend(tmp_path_factory, "llama3")
    V = be.lm.config.vocab_size
    shapes = {"insert": set(), "decode": set()}
    real_insert, real_decode = slot_engine.insert, slot_engine.decode

    def insert(params, state, ids, *a, **kw):
        shapes["insert"].add(ids.shape)
        return real_insert(params, state, ids, *a, **kw)

    def decode(*a, n_steps, window, **kw):
        shapes["decode"].add((n_steps, window))
        return real_decode(*a, n_steps=n_steps, window=window, **kw)

    monkeypatch.setattr(slot_engine, "insert", insert)
    monkeypatch.setattr(slot_engine, "decode", decode)

    def programs():
        return real_insert._cache_size() + real_decode._cache_size()

    def run(seed):
        rng = seeded_rng(seed, "mix")
        reqs = [(rng.integers(4, V, int(rng.integers(1, 101))).tolist(), int(rng.integers(1, 49))) for _ in range(32)]
        _from_four_threads(be, reqs)

    def pow2(n):
        return n > 0 and n & (n - 1) == 0

    before = programs()
    run(12)
    run(13)
    assert all(pow2(k) and k <= SLOTS and pow2(T) and 16 <= T <= 128 for k, T in shapes["insert"]), shapes
    assert all(pow2(n) and n <= 8 and pow2(W) and 16 <= W <= 256 for n, W in shapes["decode"]), shapes
    # insert: k in {1,2,4} x Tb in {16,...,128}; decode: n in {1,...,8} x window in {16,...,256}
    assert programs() - before <= 3 * 4 + 4 * 5


def test_warm_compiles_every_program_requests_within_its_limits_need(tmp_path_factory):
    """``warm(40, 20)`` on 3 slots with decode chunk 4 allocates the cache once (bucket(40) + 20 -> 128
    columns) and compiles exactly insert k {1,2,4} x Tb {16,32,64} and decode for 3 sampling branches x n
    {1,2,4} x W {16,...,128}; a 4-thread mix of prompt lengths 1..40 and limits 1..20, greedy, sampled and
    top-p, afterwards compiles nothing and never grows the
    cache, and a greedy row still equals ``generate`` alone (the filler rows of the warm-up changed no slot).
    Mutations caught: no decode-window loop; the top prompt bucket left out; the cache sized for the prompt
    only; the engine's initial state left uncommitted (the first real insert lowered its program again)."""
    be = _backend(tmp_path_factory, "llama3", slots=3)  # 3 slots: no other test's programs share these shapes
    be.decode_chunk = 4
    lowered = collections.Counter()  # programs lowered to XLA (before any compilation-cache lookup)

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            lowered[kw.get("fun_name")] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        engine = be.engine
        got = engine.warm(40, 20)
        assert got["cache_len"] == 128 and got["insert"] == 3 * 3 and got["decode"] == 3 * 3 * 4, got
        assert (lowered["jit(insert)"], lowered["jit(decode)"]) == (3 * 3, 3 * 3 * 4), lowered
        lowered.clear()
        _warm_mix_then_one_greedy_row(be, engine)
        assert not (lowered["jit(insert)"] or lowered["jit(decode)"]), f"requests compiled new programs: {lowered}"
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def _warm_mix_then_one_greedy_row(be, engine) -> None:
    """24 requests within the warm-up's limits from 4 threads (one at both limits), then one greedy row
    checked against ``generate`` alone."""
    V = be.lm.config.vocab_size
    rng = seeded_rng(14, "warm mix")
    reqs = [(rng.integers(4, V, int(rng.integers(1, 41))).tolist(), int(rng.integers(1, 21))) for _ in range(24)]
    reqs[0] = (rng.integers(4, V, 40).tolist(), 20)  # the largest request the limits allow
    reqs[1::3] = [(ids, lim, 0.8, 1.0) for ids, lim in reqs[1::3]]  # sampled: the "sample" and "filtered"
    reqs[2::3] = [(ids, lim, 0.8, 0.7) for ids, lim in reqs[2::3]]  # decode programs are warm too
    _from_four_threads(be, reqs)
    assert engine._cache_len == 128
    ids = rng.integers(4, V, 23).tolist()
    row = be.generate_ids([ids], max_new_tokens=12)[0].token_ids
    ref = _alone(be.lm, ids, 12)
    assert _min_margin(be.lm, ids, ref) > 1e-4 and list(row) == ref


def test_idle_engine_ends_its_thread_so_a_dropped_backend_is_freed(tmp_path_factory):
    """An idle engine keeps no thread: otherwise the thread would keep the backend (its weights and KV
    cache) alive after the caller dropped it, e.g. the generate stage's expert through the SFT stage.
    Mutation caught: the engine thread waiting for work forever instead of ending when idle."""
    import gc
    import weakref

    be = _backend(tmp_path_factory, "llama3")
    assert len(be.generate_ids([[5, 6, 7]], max_new_tokens=3)[0].token_ids) == 3
    engine = be.engine

    def engine_threads():  # the thread object runs a moment past clearing engine._thread (and holds the engine)
        return [t for t in threading.enumerate() if t.name == "continuous-batching" and t.is_alive()]

    t0 = time.monotonic()
    while (engine._thread is not None or engine_threads()) and time.monotonic() - t0 < 30:
        time.sleep(0.01)
    assert engine._thread is None and not engine_threads()
    ref = weakref.ref(be)
    del be, engine
    gc.collect()
    assert ref() is None, "something still holds the dropped backend"
    # A new row after the idle exit starts a fresh thread.
    assert len(_backend(tmp_path_factory, "llama3").generate_ids([[5, 6]], max_new_tokens=2)[0].token_ids) == 2
