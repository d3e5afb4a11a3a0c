"""generate(): greedy parity with transformers, per-row EOS stop, reproducible sampling, filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import left_padded_batch, make_hf_model
from teams_rl_jax import generate
from teams_rl_jax.generation import filter_logits
from teams_rl_jax.models import load_pretrained

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # Smaller init scale than the parity tests so greedy argmax is not decided by near-ties.
    ref, path = make_hf_model(tmp_path_factory.mktemp("gen"), "llama3", "v5", seed=np.random.randint(1 << 30),
                              initializer_range=0.15)
    return ref, load_pretrained(path)


def _hf_generate(ref, ids, mask, n, eos):
    with torch.no_grad():
        out = ref.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=n,
                           do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[:, ids.shape[1]:].numpy()


def test_greedy_matches_transformers_with_eos_stop(tiny):
    ref, lm = tiny
    rng = np.random.default_rng()
    ids, mask, _ = left_padded_batch(rng, (7, 3, 5, 1), lm.config.vocab_size)
    n = 12
    free = _hf_generate(ref, ids, mask, n, eos=None)
    ours = np.asarray(generate(lm, lm.params, ids, mask, max_new_tokens=n, rng=jax.random.key(0)))
    np.testing.assert_array_equal(ours, free)
    # An EOS that one row emits mid-way: that row must stop there and pad; others go on.
    eos = int(free[0, 4])
    hf = _hf_generate(ref, ids, mask, n, eos=eos)
    ours = np.asarray(generate(lm, lm.params, ids, mask, max_new_tokens=n, rng=jax.random.key(0),
                               eos_token_id=eos, pad_token_id=0))
    np.testing.assert_array_equal(ours[:, :hf.shape[1]], hf)
    assert (ours[:, hf.shape[1]:] == 0).all()
    row0_stop = list(ours[0]).index(eos)
    assert row0_stop <= 4 and (ours[0, row0_stop + 1:] == 0).all()


def test_sampling_reproducible_and_key_dependent(tiny):
    _, lm = tiny
    ids, mask, _ = left_padded_batch(np.random.default_rng(), (6, 4), lm.config.vocab_size)
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=20, top_p=0.95)
    a = generate(lm, lm.params, ids, mask, rng=jax.random.key(1), **kw)
    b = generate(lm, lm.params, ids, mask, rng=jax.random.key(1), **kw)
    c = generate(lm, lm.params, ids, mask, rng=jax.random.key(2), **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def _allowed(logits, k, p):
    """numpy reference of the allowed set: top-k, then the smallest nucleus reaching mass p."""
    order = np.argsort(-logits, kind="stable")
    keep = order[:k] if k else order
    z = logits[keep] - logits[keep].max()
    probs = np.exp(z) / np.exp(z).sum()
    cum_before = np.cumsum(probs) - probs
    return set(keep[(cum_before < p) | (np.arange(len(keep)) == 0)].tolist())


@pytest.mark.parametrize("k,p", [(5, 1.0), (0, 0.5), (8, 0.7), (1, 0.9)])
def test_filter_logits_matches_reference(k, p):
    logits = np.random.default_rng().normal(size=(16, 50)).astype(np.float32) * 3
    out = np.asarray(filter_logits(jnp.asarray(logits), jnp.int32(k), jnp.float32(p)))
    for row in range(16):
        assert set(np.flatnonzero(np.isfinite(out[row])).tolist()) == _allowed(logits[row], k, p)


def test_top_k_top_p_sampling_stays_in_allowed_set(tiny):
    _, lm = tiny
    ids, mask, _ = left_padded_batch(np.random.default_rng(), (5,) * 64, lm.config.vocab_size)
    ids[:] = ids[0]  # one prompt, 64 samples of its first new token
    logits = np.asarray(lm.apply(lm.params, ids[:1], mask[:1]))[0, -1]
    for k, p in [(3, 1.0), (0, 0.6)]:
        toks = np.asarray(generate(lm, lm.params, ids, mask, max_new_tokens=1, rng=jax.random.key(k),
                                   temperature=1.0, top_k=k, top_p=p))[:, 0]
        assert set(toks.tolist()) <= _allowed(logits, k, p)
