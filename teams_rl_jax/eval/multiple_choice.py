"""Multiple-choice evaluation by log-likelihood: a batched, jitted, sharding-ready scorer.

A choice's score is ``sum log p(continuation tokens | context)``; ``acc`` takes the argmax of the
scores and ``acc_norm`` the argmax of score / ``len(choice)`` in *characters* (lm-eval's
``api/task.py``: ``completion_len = len(choice)``, without the target delimiter); TruthfulQA-MC2's
``acc`` is the normalised probability mass on the true choices (lm-eval ``process_results_mc2``).
Ties go to the first choice (``np.argmax``), as in lm-eval.

Tokenization copies lm-eval's ``TemplateLM`` + ``HFLM`` exactly (``encode_pair``): trailing spaces of
the context move to the continuation, the pair is encoded whole and split at the context's length,
an empty context becomes the prefix token (BOS, else EOS), and over-long inputs are left-truncated to
``max_length + 1`` tokens. So per-choice log-likelihoods equal lm-eval's ``hf`` model on the same
checkpoint (a test checks 1e-4), and the harness adapter (``harness.py``) reuses this scorer.

Speed (issue 19): without a mesh, the choices of one doc share their context: one forward over each distinct
context (all but its last token, left-padded, into a KV cache), then per choice the context's last token +
the choice against that cache, so a context is run once instead of once per choice and the LM head runs
on continuation positions only (``LoglikelihoodScorer._score_shared``; lm-eval's ``hf`` shares only
one-token continuations). Requests that would be truncated, and every request with a mesh, take the
whole-row path below (``share_context=False`` forces it).

Speed/memory of the whole-row path (why it is written this way): rows are sorted by length and
right-padded to a bucketed length (multiples of ``_BUCKET``) and a fixed batch size, so a whole benchmark compiles a handful of
programs; weights are jit *arguments*, sharded over the mesh by the model's logical axes (7B: fsdp
and tensor axes), rows over ``data*fsdp``; the per-token log-prob is ``logit[target] - logsumexp``
(no second [B, T, V] log-softmax array). Peak activation memory ~ ``batch_size * T * V * 4`` bytes
for the f32 logits.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from teams_rl_jax import sharding as shd
from teams_rl_jax.data.tokenizer import load_tokenizer
from teams_rl_jax.eval.tasks import Doc, load_task
from teams_rl_jax.models import load_pretrained
from teams_rl_jax.models.llama import init_cache

_BUCKET = 32  # padded lengths are multiples of this (few compiled shapes, little padding)


def tokenizer_prefix_id(tokenizer) -> int:
    """lm-eval HFLM.prefix_token_id: BOS if the tokenizer has one, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def tok_encode(tokenizer, string: str, add_special_tokens: bool | None = None, add_bos_token: bool | None = None,
               prefix_token_id: int | None = None) -> list[int]:
    """lm-eval HFLM.tok_encode: the tokenizer's default special tokens unless told, none if the text starts with BOS."""
    kwargs = {}
    if add_special_tokens is not None:
        kwargs["add_special_tokens"] = add_special_tokens
    elif add_bos_token is not None:
        kwargs["add_special_tokens"] = add_bos_token
    if add_special_tokens is None:
        prefix = tokenizer_prefix_id(tokenizer) if prefix_token_id is None else prefix_token_id
        bos = tokenizer.decode(prefix)
        if bos and string.startswith(bos):
            kwargs["add_special_tokens"] = False
    return list(tokenizer.encode(string, **kwargs))


def encode_pair(tokenizer, context: str, continuation: str, *, add_bos_token: bool | None = None,
                prefix_token_id: int | None = None) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as lm-eval's TemplateLM.loglikelihood makes them."""
    prefix = tokenizer_prefix_id(tokenizer) if prefix_token_id is None else prefix_token_id
    enc = lambda s, **kw: tok_encode(tokenizer, s, add_bos_token=add_bos_token, prefix_token_id=prefix, **kw)  # noqa: E731
    if context == "":
        cont = enc(continuation, add_special_tokens=False)
        return ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = enc(context + continuation)
    ctx = enc(context)
    return ctx, whole[len(ctx):]


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _bucket(n: int, cap: int) -> int:
    return min(cap, _BUCKET * math.ceil(n / _BUCKET))


class LoglikelihoodScorer:
    """Scores (context ids, continuation ids) pairs with a causal LM: ``[(loglik, is_greedy)]``.

    ``lm``: a :class:`teams_rl_jax.models.LM`; ``params`` default to ``lm.params`` (pass sharded params
    with ``mesh``). ``batch_size`` rows per call (a multiple of the mesh's data*fsdp size).
    """

    def __init__(self, lm, params=None, *, batch_size: int = 32, max_length: int | None = None, mesh=None,
                 pad_id: int = 0, share_context: bool = True):
        self.lm = lm
        self.mesh = mesh
        self.pad_id = int(pad_id)
        self.max_length = int(max_length or lm.config.max_position_embeddings)
        self.batch_size = int(batch_size)
        if mesh is not None:
            rows = mesh.shape["data"] * mesh.shape["fsdp"]
            self.batch_size = rows * math.ceil(self.batch_size / rows)
            self.params = jax.device_put(lm.params if params is None else params, shd.param_shardings(lm, mesh))
            b = self._batch_sharding = shd.batch_sharding(mesh)
            self._fn = jax.jit(self._score, in_shardings=(shd.param_shardings(lm, mesh), b, b, b, b),
                               out_shardings=(shd.replicated(mesh), shd.replicated(mesh)))
        else:
            self.params = lm.params if params is None else params
            self._batch_sharding = None
            self._fn = jax.jit(self._score)
        self.share_context = bool(share_context)
        self._shared_fn = jax.jit(self._score_shared)

    def _score(self, params, ids, seg, targets, tmask):
        """Per row: sum of target log-probs where ``tmask``, and whether every target is the argmax."""
        logits = self.lm.apply(params, ids, seg)  # f32 [B, T, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        # where, not multiply: fully padded rows may hold NaN (no key to attend to) that must not leak
        ll = jnp.sum(jnp.where(tmask, tgt - lse, 0.0), axis=-1)
        greedy = jnp.all(jnp.where(tmask, jnp.argmax(logits, axis=-1) == targets, True), axis=-1)
        return ll, greedy

    def _rows(self, ctx: Sequence[int], cont: Sequence[int]) -> tuple[list[int], list[int], int]:
        """lm-eval HFLM._loglikelihood_tokens: input = (ctx + cont)[-(max_length+1):][:-1]."""
        if not cont:
            raise ValueError("empty continuation")
        whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
        return whole[:-1], whole[1:], min(len(cont), len(whole) - 1)

    def _score_shared(self, params, ctx_ids, ctx_seg, row_doc, k_ids, k_seg, k_pos, k_tgt, k_mask):
        """One forward over each distinct context, then its continuations against that context's KV cache.

        ``ctx_ids [D, Tc]``: every context but its last token, left-padded (``ctx_seg`` 1 on tokens, 0 on
        padding). ``k_ids [R, Tk]``: per (context, continuation) row, the context's last token + the
        continuation but its last token, right-padded; ``k_tgt`` the continuation, ``k_mask`` its slots,
        ``k_pos`` their positions, ``row_doc [R]`` the row's context. Returns per-row (sum, greedy) as
        :meth:`_score`; each token's log-prob is the one a full ``context + continuation`` row gives.
        """
        module, variables, rngs = self.lm._variables(params)
        D, Tc = ctx_ids.shape
        cache = init_cache(self.lm.config, D, Tc + k_ids.shape[1], self.lm.dtype)
        ctx_pos = jnp.maximum(jnp.cumsum(ctx_seg, axis=1) - 1, 0)
        _, _, cache = module.apply(variables, ctx_ids, ctx_seg, ctx_pos, cache, 0, True, True, rngs=rngs)
        cache = {"k": cache["k"][:, row_doc], "v": cache["v"][:, row_doc], "segment_ids": cache["segment_ids"][row_doc]}
        logits, _, _ = module.apply(variables, k_ids, k_seg, k_pos, cache, Tc, rngs=rngs)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, k_tgt[..., None], axis=-1)[..., 0]
        ll = jnp.sum(jnp.where(k_mask, tgt - lse, 0.0), axis=-1)
        greedy = jnp.all(jnp.where(k_mask, jnp.argmax(logits, axis=-1) == k_tgt, True), axis=-1)
        return ll, greedy

    def score_tokens(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """``[(sum log p(cont | ctx), greedy)]`` in request order.

        Without a mesh, requests that share a context (a multiple-choice doc's choices) and need no
        truncation are scored from one forward over that context (:meth:`_score_shared`); the rest (and
        every request with a mesh) as whole ``context + continuation`` rows."""
        out: list[Any] = [None] * len(requests)
        rest = list(range(len(requests)))
        if self.mesh is None and self.share_context:
            shared = [i for i in rest if requests[i][1] and len(requests[i][0]) + len(requests[i][1]) <= self.max_length + 1
                      and len(requests[i][0]) >= 1]
            self._score_shared_requests(requests, shared, out)
            done = set(shared)
            rest = [i for i in rest if i not in done]
        if rest:
            for i, r in zip(rest, self._score_rows([requests[i] for i in rest])):
                out[i] = r
        return out

    def _score_shared_requests(self, requests, idx: list[int], out: list) -> None:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in idx:
            groups.setdefault(tuple(requests[i][0]), []).append(i)
        ctxs = sorted(groups, key=len, reverse=True)
        start = 0
        while start < len(ctxs):
            # up to batch_size contexts, and their continuations up to 4x batch_size rows
            stop, rows = start, 0
            while stop < len(ctxs) and stop - start < self.batch_size and (
                    stop == start or rows + len(groups[ctxs[stop]]) <= 4 * self.batch_size):
                rows += len(groups[ctxs[stop]])
                stop += 1
            batch = ctxs[start:stop]
            start = stop
            D = _pow2(len(batch))
            R = _pow2(rows)
            Tc = _BUCKET * math.ceil(max(len(c) - 1 for c in batch) / _BUCKET) or _BUCKET
            Tk = 8 * math.ceil(max(len(requests[i][1]) for c in batch for i in groups[c]) / 8)
            ctx_ids = np.full((D, Tc), self.pad_id, np.int32)
            ctx_seg = np.zeros((D, Tc), np.int32)
            row_doc = np.zeros((R,), np.int32)
            k_ids = np.full((R, Tk), self.pad_id, np.int32)
            k_seg = np.zeros((R, Tk), np.int32)
            k_pos = np.zeros((R, Tk), np.int32)
            k_tgt = np.zeros((R, Tk), np.int32)
            k_mask = np.zeros((R, Tk), bool)
            order, r = [], 0
            for d, c in enumerate(batch):
                n = len(c) - 1
                if n:
                    ctx_ids[d, Tc - n:], ctx_seg[d, Tc - n:] = c[:-1], 1
                for i in groups[c]:
                    cont = list(requests[i][1])
                    m = len(cont)
                    row_doc[r] = d
                    k_ids[r, :m] = [c[-1]] + cont[:-1]
                    k_seg[r, :m] = 1
                    k_pos[r, :m] = np.arange(n, n + m)
                    k_tgt[r, :m] = cont
                    k_mask[r, :m] = True
                    order.append(i)
                    r += 1
            ll, greedy = self._shared_fn(self.params, ctx_ids, ctx_seg, row_doc, k_ids, k_seg, k_pos, k_tgt, k_mask)
            ll, greedy = np.asarray(ll, np.float64), np.asarray(greedy)
            for r, i in enumerate(order):
                out[i] = (float(ll[r]), bool(greedy[r]))

    def _score_rows(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """Whole rows: ``(ctx + cont)[-(max_length+1):]`` each, length-sorted, bucketed, batched."""
        rows = [self._rows(c, k) for c, k in requests]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[Any] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            T = _bucket(max(len(rows[i][0]) for i in idx), self.max_length)
            B = self.batch_size
            ids = np.full((B, T), self.pad_id, np.int32)
            tgt = np.zeros((B, T), np.int32)
            seg = np.zeros((B, T), np.int32)
            tmask = np.zeros((B, T), bool)
            for r, i in enumerate(idx):
                inp, targets, n_cont = rows[i]
                n = len(inp)
                ids[r, :n], tgt[r, :n], seg[r, :n] = inp, targets, 1
                tmask[r, n - n_cont:n] = True
            batch = (ids, seg, tgt, tmask)
            if self._batch_sharding is not None:  # placed first: a multi-process run refuses numpy with a sharding
                batch = jax.device_put(batch, self._batch_sharding)
            with shd.activation_rules(self.mesh):  # the model's activation sharding annotations (no-op without mesh)
                ll, greedy = self._fn(self.params, *batch)
            ll, greedy = np.asarray(ll, np.float64), np.asarray(greedy)
            for r, i in enumerate(idx):
                out[i] = (float(ll[r]), bool(greedy[r]))
        return out


# ---- metrics (lm-eval's definitions) -----------------------------------------------------------------------
ACC_NORM_TASKS = ("arc_easy", "arc_challenge", "hellaswag")  # tasks whose lm-eval YAML lists acc_norm


@dataclasses.dataclass
class DocResult:
    """Per-example result: per-choice log-likelihoods and the metrics."""

    lls: list[float]
    acc: float
    acc_norm: float | None
    pred: int
    pred_norm: int


def doc_metrics(doc: Doc, lls: Sequence[float]) -> DocResult:
    """lm-eval ``ConfigurableTask.process_results`` (multiple_choice) / ``process_results_mc2``."""
    lls_a = np.asarray(lls, np.float64)
    completion_len = np.array([float(len(c)) for c in doc.choices])
    pred, pred_norm = int(np.argmax(lls_a)), int(np.argmax(lls_a / completion_len))
    if doc.labels is not None:  # TruthfulQA-MC2: probability mass on the true answers
        probs = np.exp(lls_a)
        probs = probs / probs.sum()
        acc = float(probs[np.asarray(doc.labels) == 1].sum())
        return DocResult(list(map(float, lls_a)), acc, None, pred, pred_norm)
    return DocResult(list(map(float, lls_a)), float(pred == doc.gold), float(pred_norm == doc.gold), pred, pred_norm)


def _stderr(x: Sequence[float]) -> float:
    """lm-eval mean_stderr: sample standard deviation / sqrt(n)."""
    x = np.asarray(x, np.float64)
    return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


def evaluate_docs(scorer: LoglikelihoodScorer, tokenizer, docs: Sequence[Doc], task: str = "",
                  add_bos_token: bool | None = None) -> dict:
    """All choices of all docs in one batched pass; returns ``{acc, acc_stderr, [acc_norm ...], n, docs}``."""
    reqs, spans = [], []
    for d in docs:
        start = len(reqs)
        for c in d.choices:
            reqs.append(encode_pair(tokenizer, d.context, d.delimiter + c, add_bos_token=add_bos_token))
        spans.append((start, len(reqs)))
    scores = scorer.score_tokens(reqs)
    results = [doc_metrics(d, [scores[i][0] for i in range(a, b)]) for d, (a, b) in zip(docs, spans)]
    acc = [r.acc for r in results]
    out = {"n": len(docs), "acc": float(np.mean(acc)), "acc_stderr": _stderr(acc)}
    if task in ACC_NORM_TASKS:
        norm = [r.acc_norm for r in results]
        out.update(acc_norm=float(np.mean(norm)), acc_norm_stderr=_stderr(norm))
    out["docs"] = [dataclasses.asdict(r) for r in results]
    return out


def build_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1):
    """A mesh over this process's devices for the scorer, or None on a single device (no sharding
    constraints needed). In a multi-process run each host scores on its own devices (the eval stage's
    work is small next to SFT's; only process 0 writes the report)."""
    if jax.local_device_count() == 1:
        return None

    return shd.make_mesh(data, fsdp, tensor, devices=jax.local_devices())


def evaluate_checkpoint(checkpoint: str, data_dir: str, tasks: Sequence[str], *, limit: int | None = None,
                        batch_size: int = 32, max_length: int = 2048, dtype: str = "float32", mesh=None,
                        log=print) -> dict:
    """Load a local HF checkpoint dir (+ its tokenizer) and evaluate ``tasks`` read from ``data_dir``.

    Returns ``{task: {acc, acc_stderr, acc_norm?, n, docs}}``. Every task file is read (and checked)
    before the model is loaded, so a missing or malformed file fails fast.
    """
    all_docs = {t: load_task(t, data_dir, limit) for t in tasks}
    lm = load_pretrained(checkpoint, dtype=dtype, mesh=mesh)
    tok = load_tokenizer(checkpoint)
    scorer = LoglikelihoodScorer(lm, batch_size=batch_size, max_length=min(max_length, lm.config.max_position_embeddings),
                                 mesh=mesh, pad_id=tok.pad_token_id or 0)
    results = {}
    for t, docs in all_docs.items():
        results[t] = evaluate_docs(scorer, tok, docs, task=t)
        norm = f", acc_norm {results[t]['acc_norm']:.4f}" if "acc_norm" in results[t] else ""
        log(f"[eval] {t}: acc {results[t]['acc']:.4f}{norm} (n={len(docs)})")
    return results
