"""Multiple-choice scoring throughput: our jitted evaluator vs lm-eval's ``hf`` model, same checkpoint and tasks.

    python benchmarks/bench_eval.py                      # 64 ARC + 32 HellaSwag docs, batch 32, 5 rounds
    python benchmarks/bench_eval.py --hidden 256 --layers 4 --rounds 7

One tiny random Llama (transformers+torch ``save_pretrained``, word tokenizer) and two local tasks in
the public layouts (ARC: question + 3-5 short choices; HellaSwag: longer context + 4 endings). Both
implementations score every (context, " " + choice) pair and compute acc / acc_norm:

* ours: :func:`teams_rl_jax.eval.multiple_choice.evaluate_docs` (lm-eval's tokenization; one forward over
  each distinct context, then every choice against that context's KV cache, ``LoglikelihoodScorer``'s
  shared-context path; ``--compare-rows`` also times the whole-row path: each context + choice its own
  row, sorted by length, padded to 32-token buckets and a fixed batch);
* reference: lm-eval 0.4.13's ``HFLM.loglikelihood`` on the same requests (its own sorting, batching
  and one-token-continuation grouping), then the same metric code.

Examples/s = docs / time. After one warm-up call each (compilation, caches), the two run alternately
for ``--rounds`` rounds; the table gives the median and best examples/s and ratios, and the load
average before/after. The per-choice log-likelihoods of the two are checked to agree first, relative to the
continuation's length (``TOL_PER_TOKEN`` per token), and the chosen answers to be the same except at
near-ties within that tolerance (printed).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from _timing import interleave, load_average, table  # noqa: E402


def hellaswag_records(n: int, seed: int) -> list[dict]:
    from teams_rl_jax.eval.testing import WORDS

    rng = np.random.default_rng(seed)
    w = lambda k: " ".join(rng.choice(WORDS, size=k))  # noqa: E731
    return [{"activity_label": w(2), "ctx_a": w(int(rng.integers(20, 40))) + ".", "ctx_b": w(int(rng.integers(3, 8))),
             "endings": [w(int(rng.integers(6, 16))) + "." for _ in range(4)], "label": int(rng.integers(4))}
            for _ in range(n)]


# Agreement tolerance, per continuation token. Each token's log-prob is logit[t] - logsumexp(logits): both
# sides compute it in float32 from the same weights, but in different orders (XLA vs torch GEMMs, fused vs
# unfused norms), so each token carries its own rounding difference and a continuation's sum carries n of
# them. The logits come out of hidden-size dot products, whose summation error grows ~sqrt(hidden) * eps32
# relative (eps32 = 2^-23 = 1.19e-7); this random model's per-token log-probs average up to ~14 nats on a
# continuation (the run prints "max mean |log p| per token": 9.7 at hidden 128, 13-14 at 256 and 512), so at
# hidden 512: sqrt(512) * 1.19e-7 * 14 = 3.8e-5, and 5e-5 leaves room. Measured worst per token: 3.2e-5
# (hidden 512, 4 layers, ARC's 1-3-token continuations), 1.4e-5 at 256, 4.8e-6 at 128. A real bug (an
# off-by-one target, a dropped or extra token) moves a sum by whole nats, 4-5 orders above this.
TOL_PER_TOKEN = 5e-5


def check_agreement(docs, ours_out, ref_out, tok, tol_per_token: float) -> None:
    """Per choice: |ours - lm-eval| <= tol_per_token * n continuation tokens. Per doc: the same argmax (acc
    and acc_norm), except where lm-eval's own top-2 margin is within the two choices' tolerances: those
    near-ties are printed and asserted to be near-ties, not hidden. (Given the first check, a flip caused by
    the log-likelihoods alone is always such a near-tie, |o - r| <= t bounding lm-eval's margin by t_i + t_j;
    the margin assert also catches our metric code picking another answer from equal scores.)"""
    from teams_rl_jax.eval.multiple_choice import encode_pair

    for t, ds in docs.items():
        worst, near, biggest = 0.0, [], 0.0
        for d, mine, theirs in zip(ds, ours_out[t]["docs"], ref_out[t]):
            n_tok = np.array([len(encode_pair(tok, d.context, d.delimiter + c)[1]) for c in d.choices])
            got, want = np.asarray(mine["lls"]), np.asarray(theirs.lls)
            tol = tol_per_token * n_tok
            diff = np.abs(got - want)
            worst = max(worst, float(np.max(diff / n_tok)))
            biggest = max(biggest, float(np.max(np.abs(want) / n_tok)))
            assert np.all(diff <= tol), (t, diff, tol)
            lens = np.array([float(len(c)) for c in d.choices])
            for key, score, stol in (("pred", want, tol), ("pred_norm", want / lens, tol / lens)):
                if mine[key] == getattr(theirs, key):
                    continue
                i, j = mine[key], getattr(theirs, key)  # ours picked i, lm-eval picked j
                margin = float(score[j] - score[i])
                near.append((key, margin, float(stol[i] + stol[j])))
                assert margin <= stol[i] + stol[j], (t, key, i, j, margin, stol[i] + stol[j])
        print(f"agreement {t}: max |ours - lm-eval| per continuation token {worst:.2e} (tolerance {tol_per_token:.0e}; "
              f"max mean |log p| per token {biggest:.1f}); "
              f"argmax disagreements {len(near)} (each a near-tie: lm-eval margin <= tolerance: {near})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arc", type=int, default=64)
    ap.add_argument("--hellaswag", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-rows", action="store_true",
                    help="also time our scorer without the shared-context pass (whole context+choice rows)")
    ap.add_argument("--tol-per-token", type=float, default=TOL_PER_TOKEN,
                    help="agreement tolerance per continuation token (float32; see TOL_PER_TOKEN)")
    args = ap.parse_args()

    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from teams_rl_jax.data.tokenizer import load_tokenizer
    from teams_rl_jax.eval import testing as T
    from teams_rl_jax.eval.multiple_choice import LoglikelihoodScorer, doc_metrics, evaluate_docs
    from teams_rl_jax.eval.tasks import load_task
    from teams_rl_jax.models import load_pretrained

    load_before = load_average()
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    arc = T.arc_records(args.arc, seed=args.seed, n_choices=4)
    hs = hellaswag_records(args.hellaswag, seed=args.seed + 1)
    T.write_jsonl(tmp / "data" / "arc_easy.jsonl", arc)
    T.write_jsonl(tmp / "data" / "hellaswag.jsonl", hs)
    texts = [r["question"] + " " + " ".join(r["choices"]["text"]) for r in arc]
    texts += [r["activity_label"] + " " + r["ctx_a"] + " " + r["ctx_b"] + " " + " ".join(r["endings"]) for r in hs]
    ckpt = T.make_tiny_checkpoint(tmp / "ckpt", texts + ["Question: Answer:"], seed=args.seed, hidden=args.hidden,
                                  layers=args.layers, init_range=0.1, vocab_size=1024)
    docs = {t: load_task(t, tmp / "data") for t in ("arc_easy", "hellaswag")}
    n_docs = sum(len(d) for d in docs.values())

    import jax

    # float32 on both sides: torch's CUDA matmuls default to full float32 (no TF32); XLA:GPU's default
    # precision may use TF32, whose ~1e-3 relative error would fail the agreement check, so pin "highest".
    jax.config.update("jax_default_matmul_precision", "highest")
    lm = load_pretrained(ckpt)
    tok = load_tokenizer(ckpt)
    scorer = LoglikelihoodScorer(lm, batch_size=args.batch, max_length=lm.config.max_position_embeddings)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = HFLM(pretrained=str(ckpt), batch_size=args.batch, device=device, dtype="float32")

    def ours():
        return {t: evaluate_docs(scorer, tok, d, task=t) for t, d in docs.items()}

    rows_scorer = LoglikelihoodScorer(lm, batch_size=args.batch, max_length=lm.config.max_position_embeddings,
                                      share_context=False)

    def ours_rows():
        return {t: evaluate_docs(rows_scorer, tok, d, task=t) for t, d in docs.items()}

    def ref():
        out = {}
        for t, ds in docs.items():
            reqs = [Instance("loglikelihood", None, (d.context, " " + c), i) for d in ds for i, c in enumerate(d.choices)]
            with torch.inference_mode():
                lls = [r[0] for r in hf.loglikelihood(reqs, disable_tqdm=True)]
            k, res = 0, []
            for d in ds:
                res.append(doc_metrics(d, lls[k:k + len(d.choices)]))
                k += len(d.choices)
            out[t] = res
        return out

    # agreement first: a fast wrong scorer is no result
    a, b = ours(), ref()
    check_agreement(docs, a, b, tok, args.tol_per_token)
    if args.compare_rows:
        check_agreement(docs, ours_rows(), b, tok, args.tol_per_token)

    import time

    def rate(fn):
        def run():
            t0 = time.perf_counter()
            fn()
            return {"examples/s": n_docs / (time.perf_counter() - t0)}
        return run

    impls = {"ours (jax, jitted)": rate(ours), "lm-eval hf (torch)": rate(ref)}
    if args.compare_rows:
        impls["ours, whole rows (no shared context)"] = rate(ours_rows)
    results = interleave(impls, args.rounds)
    print(f"tasks: arc_easy {len(docs['arc_easy'])} docs + hellaswag {len(docs['hellaswag'])} docs "
          f"({sum(len(d.choices) for ds in docs.values() for d in ds)} choices); model hidden {args.hidden}, "
          f"{args.layers} layers, vocab {lm.config.vocab_size}; batch {args.batch}; torch on {device}, jax on "
          f"{jax.devices()[0].platform}; torch threads "
          f"{torch.get_num_threads()}")
    load_after = load_average()
    print(table(results, "ours (jax, jitted)", "lm-eval hf (torch)", load_before, load_after, unit="ex/s"))
    if args.compare_rows:
        print(table(results, "ours, whole rows (no shared context)", "lm-eval hf (torch)", load_before, load_after,
                    unit="ex/s"))
        print(table(results, "ours (jax, jitted)", "ours, whole rows (no shared context)", load_before, load_after,
                    unit="ex/s"))


if __name__ == "__main__":
    main()
