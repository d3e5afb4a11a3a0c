"""Test helpers: a tiny random Llama checkpoint made with transformers+torch, and tiny benchmark files.

Used by ``tests/test_eval_*.py`` and ``benchmarks/bench_eval.py`` (no model hub: the checkpoint is a
``save_pretrained`` of a random ``LlamaForCausalLM`` plus a word-level tokenizer built from the text,
loadable by lm-eval's ``hf`` model and by :func:`teams_rl_jax.models.load_pretrained`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from teams_rl_jax.data.tokenizer import build_word_tokenizer
from teams_rl_jax.env import phrases
from teams_rl_jax.env.operations import OPERATIONS
from teams_rl_jax.eval.mia import _BUCKET, _loss_fn
from teams_rl_jax.layout import RunLayout
from teams_rl_jax.models import init, save_pretrained

WORDS = ("sun moon star river stone tree cloud rain wind fire water earth light dark cold warm fast slow big "
         "small red blue green bird fish wolf horse seed leaf root snow ice sand hill road ship door book lamp "
         "salt bread milk iron gold glass rope bell clock").split()


def make_tiny_checkpoint(path: str | Path, texts: Iterable[str], *, seed: int = 0, hidden: int = 64, layers: int = 2,
                         init_range: float = 0.02, max_positions: int = 512, vocab_size: int = 512) -> Path:
    """Save a random tiny Llama (transformers+torch) + a word tokenizer of ``texts`` to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_word_tokenizer(list(texts), vocab_size=vocab_size)
    tok.save_pretrained(str(path))
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden + 32,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max_positions, initializer_range=init_range, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def arc_records(n: int, seed: int = 0, n_choices: int = 4) -> list[dict]:
    """``n`` ARC-layout (Hugging Face ai2_arc) records of random words; seeded."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS, size=int(rng.integers(4, 9))))
        texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 4)))) for _ in range(n_choices)]
        labels = list("ABCDEFG"[:n_choices])
        out.append({"id": f"q{i}", "question": f"What is the {q}?",
                    "choices": {"text": texts, "label": labels}, "answerKey": labels[int(rng.integers(n_choices))]})
    return out


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """One JSON object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def arc_task_yaml(name: str, data_file: str | Path) -> str:
    """An lm-eval task YAML over a local ARC-layout JSONL, with the arc_easy prompt and metrics."""
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {Path(data_file).resolve()}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def alpaca_records(n: int, seed: int = 0) -> list[dict]:
    """``n`` Alpaca records of random words (instruction, empty input, output); seeded."""
    rng = np.random.default_rng(seed)
    return [{"instruction": "Tell me about the " + " ".join(rng.choice(WORDS, size=int(rng.integers(3, 7)))) + ".",
             "input": "", "output": " ".join(rng.choice(WORDS, size=int(rng.integers(6, 14)))) + "."}
            for _ in range(n)]


def overfit(lm, seqs, *, steps: int = 60, lr: float = 3e-3, batch: int = 16, seed: int = 0):
    """Fine-tune ``lm`` on ``seqs`` [(ids, loss_mask)] with Adam until it memorises them; returns params."""
    import jax
    import jax.numpy as jnp
    import optax

    T = _BUCKET * int(np.ceil((max(len(x) for x, _ in seqs) - 1) / _BUCKET))
    n = len(seqs)
    ids, tgt, seg, tm = (np.zeros((n, T), np.int32) for _ in range(4))
    for r, (x, m) in enumerate(seqs):
        k = len(x) - 1
        ids[r, :k], tgt[r, :k], seg[r, :k], tm[r, :k] = x[:-1], x[1:], 1, m[1:]
    loss = _loss_fn(lm)
    opt = optax.adam(lr)

    @jax.jit
    def step(params, state, ids, seg, tgt, tm):
        def f(p):
            return jnp.mean(loss(p, ids, seg, tgt, tm))

        val, g = jax.value_and_grad(f)(params)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state, val

    params, state = lm.params, opt.init(lm.params)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        rows = rng.choice(n, size=min(batch, n), replace=False)
        params, state, _ = step(params, state, ids[rows], seg[rows], tgt[rows], tm[rows].astype(bool))
    return params


def fake_run_dir(run_dir: str | Path, *, seed: int = 0, n: int = 24, checkpoint: bool = True) -> Path:
    """A run dir as the earlier stages leave it: data/generated.jsonl + summary.json, data/baselines/random/,
    policy/curves*.jsonl + summary.json and (``checkpoint``) a tiny random sft/hf export with its tokenizer."""
    run = Path(run_dir)
    layout = RunLayout(run)
    rng = np.random.default_rng(seed)
    texts = []
    for name, k in (("generated", 0), ("random", 1)):
        recs = alpaca_records(n, seed=seed * 10 + k)
        for r in recs:
            ops = [str(o) for o in rng.choice(OPERATIONS, size=int(rng.integers(1, 4)))]
            for o in ops:  # what the token-edit operator appends (the env's complexity measures count these)
                if o in ("add_constraints", "increase_reasoning_steps", "deepening") and k == 0:
                    r["instruction"] += " " + str(rng.choice(phrases.BANKS[o]))
            r["meta"] = {"seed_id": str(rng.integers(100)), "ops": ops, "step": len(ops),
                         "queries": {"instructor": len(ops), "reviewer": len(ops), "expert": 1}}
        hist: dict = {}
        for r in recs:
            for o in r["meta"]["ops"]:
                hist[o] = hist.get(o, 0) + 1
        summary = {"kept": n, "eliminated": {"no_gain": 3 + k, "sorry_short": k, "stopwords_only": 0,
                                             "template_copy": 1},
                   "duplicates": {"exact": 1, "near": k}, "queries": {"instructor": 60 + 9 * k, "reviewer": 60 + 9 * k,
                                                                      "expert": 30 + k},
                   "op_histogram": hist}
        out = layout.data if name == "generated" else layout.data.baseline(name)
        write_jsonl(out.records, recs)
        out.summary.write_text(json.dumps(summary))
        texts += [r["instruction"] + " " + r["output"] for r in recs]
    pol = layout.policy
    pol.root.mkdir(parents=True, exist_ok=True)
    for path, slope in ((pol.curves(), 0.02), (pol.curves("random"), 0.0)):
        rows = [{"update": i + 1, "episodes": 8 * (i + 1), "return": float(slope * i + 0.1 * rng.random()),
                 "cumulative_queries": 0.0} for i in range(10)]
        write_jsonl(path, rows)
    pol.summary.write_text(json.dumps({"policy": {"final_return": 0.2, "mean_return": 0.1,
                                                              "total_queries": 0.0},
                                                   "baselines": {"random": {"final_return": 0.05, "mean_return": 0.05,
                                                                            "total_queries": 0.0}}}))
    if checkpoint:
        import jax

        tok = build_word_tokenizer(texts + ["Below is an instruction that describes a task. Write a response that "
                                            "appropriately completes the request. ### Instruction: ### Response:"],
                                   vocab_size=512)
        lm = init(dict(model_type="llama", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0), jax.random.key(seed))
        save_pretrained(lm, layout.sft.hf)
        tok.save_pretrained(str(layout.sft.hf))
    return run
