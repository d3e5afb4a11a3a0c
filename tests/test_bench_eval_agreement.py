"""``benchmarks/bench_eval.py``'s agreement check: per-token tolerance, argmax agreement, near-ties asserted.

Mutations tried (each made this file fail):
  1. tolerance back to a fixed absolute one (``tol = tol_per_token``, not times the token count) ->
     test_tolerance_scales_with_continuation_length.
  2. the ``diff <= tol`` assert removed -> test_tolerance_scales_with_continuation_length (the 2x case).
  3. argmax disagreements skipped without the margin assert -> test_argmax_disagreement_outside_tie_fails.
  4. the near-tie list not printed (``near`` never appended) -> test_near_tie_is_reported.
"""

import sys
from pathlib import Path

import helpers
import numpy as np
import pytest

from teams_rl_jax.eval.multiple_choice import doc_metrics, encode_pair
from teams_rl_jax.eval.tasks import Doc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_eval  # noqa: E402


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return helpers.make_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=300)


DOC = Doc(context="Explain why the sky looks blue.", choices=("Sunlight is scattered by the air.", "Red"), gold=0)


def _outs(doc, ours_lls, ref_lls):
    mine = doc_metrics(doc, ours_lls)
    return ({"t": {"docs": [{"lls": mine.lls, "pred": mine.pred, "pred_norm": mine.pred_norm}]}},
            {"t": [doc_metrics(doc, ref_lls)]})


def _n_tokens(tok, doc):
    return np.array([len(encode_pair(tok, doc.context, doc.delimiter + c)[1]) for c in doc.choices])


def test_tolerance_scales_with_continuation_length(tok, capsys):
    n = _n_tokens(tok, DOC)
    assert n[0] >= 4 * n[1]  # a long and a short continuation
    tol = 1e-5
    ref = np.array([-30.0, -12.0])
    # The long choice may differ by 0.9 * tol * its n tokens (more than tol alone): accepted.
    ours = ref + np.array([0.9 * tol * n[0], 0.0])
    bench_eval.check_agreement({"t": [DOC]}, *_outs(DOC, ours, ref), tok, tol)
    assert "argmax disagreements 0" in capsys.readouterr().out
    # The short choice off by 2x its tolerance: refused.
    with pytest.raises(AssertionError):
        bench_eval.check_agreement({"t": [DOC]}, *_outs(DOC, ref + np.array([0.0, 2 * tol * n[1]]), ref), tok, tol)


def test_argmax_disagreement_outside_tie_fails(tok):
    """Equal log-likelihoods but ours reports another answer (a bug in our metric code, e.g. acc_norm's
    length): lm-eval's margin is 1 nat, far outside the tolerance, so the check fails. (With the
    log-likelihoods within tolerance, an argmax flip from them alone is always a near-tie: |o - r| <= t
    for both choices bounds lm-eval's margin by t_i + t_j.)"""
    ref = [-10.0, -11.0]
    ours_out, ref_out = _outs(DOC, ref, ref)
    ours_out["t"]["docs"][0]["pred"] = 1
    with pytest.raises(AssertionError):
        bench_eval.check_agreement({"t": [DOC]}, ours_out, ref_out, tok, 1e-5)


def test_near_tie_is_reported(tok, capsys):
    """A top-2 margin inside the tolerance may flip the argmax; it is listed with its margin, not hidden."""
    n = _n_tokens(tok, DOC)
    tol = 1e-5
    ref = np.array([-11.0, -11.0 - 0.5 * tol])  # lm-eval: choice 0 by 0.5 tol
    ours = np.array([-11.0 - 0.3 * tol, -11.0 - 0.1 * tol])  # ours: choice 1 (within tol * n of ref each)
    assert np.all(np.abs(ours - ref) <= tol * n)
    bench_eval.check_agreement({"t": [DOC]}, *_outs(DOC, ours, ref), tok, tol)
    out = capsys.readouterr().out
    assert "argmax disagreements 1" in out and "'pred'" in out
