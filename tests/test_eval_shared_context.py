"""The scorer's shared-context path equals its whole-row path (which tests/test_eval_harness.py checks against
lm-eval's ``hf`` model): one forward over a context, then each continuation against its KV cache.

Mutations tried (each made this file fail):
  1. continuation positions off by one (``np.arange(n + 1, n + 1 + m)``).
  2. the context's last token dropped from the continuation rows (``k_ids[r, :m] = cont``, targets shifted).
  3. every row reads the first context's cache (``row_doc[r] = 0``).
  4. context padding attended (``ctx_seg`` ones on the padding too).
  (Not a bug, so not caught: right- instead of left-padded contexts give the same scores, the padding
  slots being masked either way.)
  5. rows un-sorted wrongly (``out[i]`` written in group order, not request order).
  6. truncated requests sent down the shared path (length check removed) -> test_truncated_requests_fall_back.
"""

import numpy as np
import pytest

from teams_rl_jax.eval import testing as T
from teams_rl_jax.eval.multiple_choice import LoglikelihoodScorer
from teams_rl_jax.models import load_pretrained


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shared_ctx")
    ckpt = T.make_tiny_checkpoint(tmp / "ckpt", ["sun moon star river stone tree cloud rain"], seed=3, hidden=64,
                                  layers=2, init_range=0.1, vocab_size=256)
    return load_pretrained(ckpt)


def _requests(seed: int, vocab: int):
    rng = np.random.default_rng(seed)
    tok = lambda n: [int(x) for x in rng.integers(4, vocab, size=n)]  # noqa: E731
    reqs = []
    for n_ctx in (1, 2, 7, 13, 40, 41, 70):  # 1: the prefix-token-only context of an empty context
        ctx = tok(n_ctx)
        for n_cont in (1, 1, 3, 9):  # single-token continuations too (lm-eval's one-token case)
            reqs.append((ctx, tok(n_cont)))
    reqs.append((tok(5), tok(2)))  # a context with one continuation
    order = rng.permutation(len(reqs))  # choices of one context not adjacent
    return [reqs[i] for i in order]


def test_shared_equals_whole_rows(lm):
    reqs = _requests(0, lm.config.vocab_size)
    shared = LoglikelihoodScorer(lm, batch_size=4)  # several batches of contexts
    rows = LoglikelihoodScorer(lm, batch_size=8, share_context=False)
    a, b = shared.score_tokens(reqs), rows.score_tokens(reqs)
    np.testing.assert_allclose([x[0] for x in a], [x[0] for x in b], atol=1e-5, rtol=0)
    assert [x[1] for x in a] == [x[1] for x in b]
    assert all(x[0] < 0 for x in a)


def test_greedy_continuation_is_flagged(lm):
    """A continuation made of the model's own argmax tokens is greedy on the shared path."""
    import jax.numpy as jnp

    ctx = [5, 9, 17, 33, 61]
    seq = list(ctx)
    for _ in range(3):
        logits = lm.apply(lm.params, jnp.asarray([seq], jnp.int32))
        seq.append(int(jnp.argmax(logits[0, -1])))
    cont = seq[len(ctx):]
    other = [(cont[0] + 1) % lm.config.vocab_size] + cont[1:]
    out = LoglikelihoodScorer(lm, batch_size=4).score_tokens([(ctx, cont), (ctx, other)])
    assert out[0][1] is True and out[1][1] is False


def test_truncated_requests_fall_back(lm):
    """Over max_length the request is left-truncated as lm-eval does: the whole-row path scores it."""
    reqs = [([7] * 50 + [9, 11], [12, 13, 14]), ([7] * 50 + [9, 11], [15])]
    short = LoglikelihoodScorer(lm, batch_size=4, max_length=32)
    rows = LoglikelihoodScorer(lm, batch_size=4, max_length=32, share_context=False)
    np.testing.assert_allclose([x[0] for x in short.score_tokens(reqs)], [x[0] for x in rows.score_tokens(reqs)],
                               atol=1e-5, rtol=0)
