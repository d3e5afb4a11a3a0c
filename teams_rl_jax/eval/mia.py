"""Membership inference (the paper's privacy evidence): is a record in the fine-tuning set?

Two attacks, both thresholding a per-record score (higher = "member"):

* ``loss``: score = -L_target(x), the target model's mean per-token loss on the record's response
  (Yeom et al. 2018). Records the model was fine-tuned on have lower loss.
* ``reference``: score = -(L_target(x) - L_ref(x)) (Carlini et al. 2022 / Mireshghallah et al.
  2022's likelihood-ratio form): a reference model (e.g. the pre-SFT base model) calibrates away
  how hard the record is in itself, so only what fine-tuning added remains.

L(x) is the SFT loss itself: the record rendered with the SFT template (Alpaca / Vicuna) and the
loss mask on the response + EOS tokens (``data.tokenize``), so "member" means exactly "trained on".
Metrics: ROC AUC (``sklearn.metrics.roc_auc_score``) and TPR at 1% FPR (the largest TPR on the ROC
curve at FPR <= 0.01, as Carlini et al. report it), and the ROC curve (``roc_curve``) for the plot.
AUC 0.5 = no leakage; the paper reports 0.47 (TeaMs-RL data) vs 0.72 (WizardLM data).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from teams_rl_jax.data.readers import read_dataset
from teams_rl_jax.data.tokenize import tokenize_dataset
from teams_rl_jax.data.tokenizer import load_tokenizer
from teams_rl_jax.errors import DataError
from teams_rl_jax.eval.report import plot_roc
from teams_rl_jax.models.lm import load_pretrained

_BUCKET = 32


def _loss_fn(lm):
    def fn(params, ids, seg, targets, tmask):
        logits = lm.apply(params, ids, seg)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        nll = jnp.where(tmask, lse - tgt, 0.0)
        return jnp.sum(nll, -1) / jnp.maximum(jnp.sum(tmask, -1), 1)  # mean over response tokens

    return fn


def tokenize_records(examples, tokenizer, template: str = "alpaca", max_seq_len: int = 256
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(ids, loss_mask)]`` by the SFT tokenization (examples whose response does not fit are dropped)."""
    seqs, _ = tokenize_dataset(examples, tokenizer, template, max_seq_len)
    return seqs


class LossScorer:
    """Mean response-token loss per record: batched, jitted (weights are arguments), length-bucketed."""

    def __init__(self, lm, batch_size: int = 16, pad_id: int = 0):
        self.lm, self.batch_size, self.pad_id = lm, int(batch_size), int(pad_id)
        self._fn = jax.jit(_loss_fn(lm))

    def __call__(self, params, seqs: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        out = np.zeros(len(seqs), np.float64)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            T = _BUCKET * math.ceil((max(len(seqs[i][0]) for i in idx) - 1) / _BUCKET)
            B = self.batch_size
            ids = np.full((B, T), self.pad_id, np.int32)
            tgt, seg, tm = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32), np.zeros((B, T), bool)
            for r, i in enumerate(idx):
                x, m = seqs[i]
                n = len(x) - 1
                ids[r, :n], tgt[r, :n], seg[r, :n], tm[r, :n] = x[:-1], x[1:], 1, m[1:].astype(bool)
            loss = np.asarray(self._fn(params, ids, seg, tgt, tm))
            out[idx] = loss[:len(idx)]
        return out


def attack_metrics(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> dict:
    """ROC AUC, TPR@1%FPR and the ROC curve of scores where higher means "member"."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    s = np.r_[member_scores, nonmember_scores]
    fpr, tpr, _ = roc_curve(y, s)
    ok = fpr <= 0.01
    return {"auc": float(roc_auc_score(y, s)), "tpr_at_1pct_fpr": float(tpr[ok].max()) if ok.any() else 0.0,
            "members": int(len(member_scores)), "non_members": int(len(nonmember_scores)),
            "roc": {"fpr": [round(float(v), 6) for v in fpr], "tpr": [round(float(v), 6) for v in tpr]}}


def loss_attack(target_members: np.ndarray, target_non: np.ndarray) -> dict:
    """Score = -loss under the fine-tuned model."""
    return attack_metrics(-np.asarray(target_members), -np.asarray(target_non))


def reference_attack(target_members, target_non, ref_members, ref_non) -> dict:
    """Score = -(target loss - reference loss)."""
    return attack_metrics(-(np.asarray(target_members) - np.asarray(ref_members)),
                          -(np.asarray(target_non) - np.asarray(ref_non)))


def _record_key(ex) -> tuple:
    return (ex.instruction.strip(), ex.input.strip(), ex.output.strip())


def disjoint(non_members, members) -> list:
    """``non_members`` minus any record (instruction, input, output) that is also a member."""
    seen = {_record_key(e) for e in members}
    return [e for e in non_members if _record_key(e) not in seen]


def run_mia(checkpoint: str | Path, members, non_members, *, reference: str | Path | None = None,
            template: str = "alpaca", max_seq_len: int = 256, max_examples: int = 256, batch_size: int = 16,
            plot: str | Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Run the attacks on a local HF checkpoint. ``members``/``non_members``: dataset paths or lists of
    :class:`~teams_rl_jax.data.example.Example`. Non-members that are also members are removed; both sides
    are cut to ``max_examples``. Returns ``{"loss": metrics, "reference": metrics?, ...}``."""
    mem = read_dataset(members) if isinstance(members, (str, Path)) else list(members)
    non = read_dataset(non_members) if isinstance(non_members, (str, Path)) else list(non_members)
    non = disjoint(non, mem)
    if len(mem) < 1 or len(non) < 1:
        raise DataError(f"membership inference needs members and non-members (got {len(mem)} members, {len(non)} "
                        "non-members not in the member set)")
    tok = load_tokenizer(checkpoint)
    seq_m = tokenize_records(mem[:max_examples], tok, template, max_seq_len)
    seq_n = tokenize_records(non[:max_examples], tok, template, max_seq_len)
    lm = load_pretrained(checkpoint)
    scorer = LossScorer(lm, batch_size, tok.pad_token_id or 0)
    tm, tn = scorer(lm.params, seq_m), scorer(lm.params, seq_n)
    out = {"loss": loss_attack(tm, tn), "member_loss_mean": float(tm.mean()), "non_member_loss_mean": float(tn.mean())}
    log(f"[eval] MIA loss attack: AUC {out['loss']['auc']:.3f}, TPR@1%FPR {out['loss']['tpr_at_1pct_fpr']:.3f} "
        f"({len(seq_m)} members, {len(seq_n)} non-members)")
    if reference is not None:
        ref = load_pretrained(reference)
        if ref.config.vocab_size < len(tok):
            raise DataError(f"reference {reference}: vocab_size {ref.config.vocab_size} < the target tokenizer's "
                            f"{len(tok)} tokens (the reference must share the target's tokenizer)")
        rscorer = LossScorer(ref, batch_size, tok.pad_token_id or 0)
        rm, rn = rscorer(ref.params, seq_m), rscorer(ref.params, seq_n)
        out["reference"] = reference_attack(tm, tn, rm, rn)
        log(f"[eval] MIA reference attack: AUC {out['reference']['auc']:.3f}, "
            f"TPR@1%FPR {out['reference']['tpr_at_1pct_fpr']:.3f}")
    if plot is not None:
        plot_roc(plot, {k: v for k, v in out.items() if isinstance(v, dict) and "roc" in v})
    return out
