"""Membership inference: a tiny Llama overfit on members separates them; disjoint non-member sets do not.

The fine-tuned model is our Flax Llama (random init, word tokenizer over all records so no word is
unknown to either side), trained with Adam on the member set's SFT loss (Alpaca template, loss on
the response). Non-member sets are 200 records each so the null AUC's standard deviation (~0.03) is
well inside the 0.5 +- 0.1 band.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from teams_rl_jax.data.readers import Example
from teams_rl_jax.eval import mia
from teams_rl_jax.eval import testing as T
from teams_rl_jax.models import init

SEED = 3


def _examples(recs):
    return [Example(instruction=r["instruction"], input=r["input"], output=r["output"]) for r in recs]


@pytest.fixture(scope="module")
def setup():
    from teams_rl_jax.data.tokenizer import build_word_tokenizer

    recs = T.alpaca_records(32 + 400, seed=SEED)
    members, non_a, non_b = _examples(recs[:32]), _examples(recs[32:232]), _examples(recs[232:])
    tok = build_word_tokenizer([r["instruction"] + " " + r["output"] + " Instruction Response Below is an "
                                "instruction that describes a task. Write a response that appropriately completes "
                                "the request." for r in recs], vocab_size=512)
    lm = init(dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                   eos_token_id=2, pad_token_id=0), jax.random.key(SEED))
    seqs = {k: mia.tokenize_records(v, tok, "alpaca", 128) for k, v in
            (("m", members), ("a", non_a), ("b", non_b))}
    tuned = T.overfit(lm, seqs["m"], steps=80, lr=3e-3, seed=SEED)
    scorer = mia.LossScorer(lm, batch_size=64)
    losses = {k: scorer(tuned, s) for k, s in seqs.items()}
    ref = {k: scorer(lm.params, s) for k, s in seqs.items()}
    return losses, ref


def test_overfit_members_are_detected(setup):
    """Loss attack AUC > 0.9 on members vs non-members (fails if the score sign is flipped: members
    would then look like non-members); the reference-calibrated attack too."""
    losses, ref = setup
    m = mia.loss_attack(losses["m"], losses["a"])
    print("loss attack", m["auc"], "non-member pairs", mia.loss_attack(losses["a"], losses["b"])["auc"])
    assert m["auc"] > 0.9, (m["auc"], SEED)
    assert 0.0 <= m["tpr_at_1pct_fpr"] <= 1.0 and m["members"] == 32 and m["non_members"] == 200
    r = mia.reference_attack(losses["m"], losses["a"], ref["m"], ref["a"])
    assert r["auc"] > 0.9, (r["auc"], SEED)


def test_disjoint_non_member_sets_are_indistinguishable(setup):
    """Two disjoint non-member sets: AUC within 0.5 +- 0.1 for both attacks."""
    losses, ref = setup
    for res in (mia.loss_attack(losses["a"], losses["b"]),
                mia.reference_attack(losses["a"], losses["b"], ref["a"], ref["b"])):
        assert abs(res["auc"] - 0.5) < 0.1, (res["auc"], SEED)


def test_metrics_against_hand_computed():
    """AUC = P(score_member > score_non) (+ half the ties); TPR@1%FPR read off the ROC curve."""
    rng = np.random.default_rng(SEED)
    a, b = rng.normal(1.0, 1.0, 300), rng.normal(0.0, 1.0, 300)
    res = mia.attack_metrics(a, b)
    pairs = (a[:, None] > b[None, :]).mean() + 0.5 * (a[:, None] == b[None, :]).mean()
    assert abs(res["auc"] - pairs) < 1e-9, SEED
    # FPR <= 1% of 300 admits 3 non-members above the threshold: the best threshold sits just above the 4th
    fourth = np.sort(b)[-4]
    assert abs(res["tpr_at_1pct_fpr"] - (a > fourth).mean()) < 1e-9, (res["tpr_at_1pct_fpr"], SEED)
    assert res["roc"]["fpr"][0] == 0.0 and res["roc"]["tpr"][-1] == 1.0


def test_loss_scorer_is_mean_response_token_nll():
    """LossScorer = mean NLL over the loss-mask (response + EOS) tokens only, computed here in float64
    numpy from the full logits; catches a dropped mask (prompt tokens counted) or an off-by-one shift."""
    from teams_rl_jax.data.tokenizer import build_word_tokenizer

    recs = T.alpaca_records(5, seed=SEED)
    tok = build_word_tokenizer([r["instruction"] + " " + r["output"] for r in recs], vocab_size=256)
    lm = init(dict(model_type="llama", vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, bos_token_id=1,
                   eos_token_id=2, pad_token_id=0, initializer_range=0.3), jax.random.key(SEED))
    seqs = mia.tokenize_records(_examples(recs), tok, "alpaca", 96)
    got = mia.LossScorer(lm, batch_size=8)(lm.params, seqs)  # 5 rows in a batch of 8: padded rows too
    L = max(len(x) for x, _ in seqs)
    batch = np.zeros((len(seqs), L), np.int32)
    for r, (x, _) in enumerate(seqs):
        batch[r, :len(x)] = x
    # one call (right padding does not change a causal model's logits at the real positions)
    all_logits = np.asarray(lm.apply(lm.params, batch, (batch > 0).astype(np.int32)), np.float64)
    for r, ((ids, mask), g) in enumerate(zip(seqs, got)):
        logits = all_logits[r, :len(ids) - 1]
        mx = logits.max(-1, keepdims=True)
        logp = logits - mx - np.log(np.exp(logits - mx).sum(-1, keepdims=True))
        nll = -logp[np.arange(len(ids) - 1), ids[1:]]
        m = mask[1:].astype(bool)
        assert 0 < m.sum() < len(m)
        assert abs(g - nll[m].mean()) < 1e-4, (g, nll[m].mean(), SEED)
