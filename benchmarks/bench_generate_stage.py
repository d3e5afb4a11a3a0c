"""Generate-stage throughput with the flax backend vs the bare batched decode of ``bench_generate.py``.

The same random Llama (bench_generate.py's default shape) answers as the stage's expert: a round runs
the stage over ``--batch`` seeds for ``--steps`` evolution steps (token-edit operator, no cache, no
near-duplicate encoder), i.e. ``--steps`` batched ``complete`` calls of ``--batch`` prompts, and counts
the generated tokens per second of the stage's loop (selection, token-edit operator, filters, expert
calls, records and fsyncs; the one-time set-up of selector and operator excluded).
The reference is ``teams_rl_jax.generate`` alone on the same model, batch, prompt bucket and
``--new`` tokens, timed as bench_generate.py does (decode tokens/s = B*(new-1) / (t(new) - t(1))).
Both are warmed up (compiled) first and then interleaved over ``--rounds`` rounds.

    python benchmarks/bench_generate_stage.py            # prints median/best ratio and the load average
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np


class TokenCount:
    """Backend wrapper that sums generated tokens (the stage itself never sees token counts)."""

    def __init__(self, inner):
        self.inner, self.role, self.model, self.counter = inner, inner.role, inner.model, inner.counter
        self.tokens = 0

    def complete(self, prompts, **kw):
        out = self.inner.complete(prompts, **kw)
        self.tokens += sum(len(c.token_ids or ()) for c in out)
        return out

    def score(self, *a):
        return self.inner.score(*a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from teams_rl_jax import generate
    from teams_rl_jax.backends.config import RoleConfig, RolesConfig
    from teams_rl_jax.backends.flax_backend import FlaxBackend
    from teams_rl_jax.env.seeds import offline_tokenizer
    from teams_rl_jax.evolve import GenerateConfig, read_seeds, run_generate_stage
    from teams_rl_jax.models import init

    seeds = read_seeds()
    tok = offline_tokenizer([s.text for s in seeds])
    lm = init(dict(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                   intermediate_size=int(args.hidden * 8 / 3) // 64 * 64, num_hidden_layers=args.layers,
                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
                   initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=0), jax.random.key(0))
    # eos_ids=(): rows run to --new tokens in both measurements (same work per call)
    expert = TokenCount(FlaxBackend.from_lm(lm, tok, role="expert", max_batch=args.batch, eos_ids=()))
    cfg = GenerateConfig(selector="random", operator_role="token_edit", steps=args.steps, max_seeds=args.batch,
                         batch_seeds=args.batch, near_dup_threshold=None,
                         baselines=(), cache=False, progress=False, temperature=0.0)
    # The expert's answer length is its role's (roles.expert.max_new_tokens); the role is only read for it.
    roles = RolesConfig(expert=RoleConfig(backend="flax", checkpoint="unused", max_new_tokens=args.new))
    # The stage's prompt bucket: what the expert is sent (chat-rendered seeds), padded like the backend does.
    lens = [len(expert.inner.encode(expert.inner.render([{"role": "user", "content": s.text}])))
            for s in seeds[:args.batch]]
    width = 1 << max(int(np.ceil(np.log2(max(lens)))), 4)
    ids = np.random.default_rng(0).integers(3, len(tok), size=(args.batch, width)).astype(np.int32)
    mask = np.ones_like(ids)

    def ref(n):
        np.asarray(generate(lm, lm.params, ids, mask, max_new_tokens=n, rng=jax.random.key(0)))

    def stage(tmp: Path):
        expert.tokens = 0
        s = run_generate_stage(cfg, tmp, roles, backends={"expert": expert}, log=lambda m: None)
        # the stage's own loop time: selection, operator, filters, expert calls, fsynced records
        # (one-time set-up of the selector/operator excluded)
        return expert.tokens / s["loop_seconds_this_run"]

    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        ref(1), ref(args.new), stage(Path(d) / "warm")  # compile everything once
        ours, theirs = [], []
        for r in range(args.rounds):
            ours.append(stage(Path(d) / f"r{r}"))
            t = time.perf_counter(); ref(1); t1 = time.perf_counter() - t  # noqa: E702
            t = time.perf_counter(); ref(args.new); tn = time.perf_counter() - t  # noqa: E702
            theirs.append(args.batch * (args.new - 1) / (tn - t1) if tn > t1 else float("nan"))  # toy sizes: noise
    load1 = os.getloadavg()
    ratios = [a / b for a, b in zip(ours, theirs)]
    print(f"model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; batch {args.batch}, prompt bucket "
          f"{width}, {args.new} new tokens, {args.steps} steps/round, {args.rounds} rounds, {jax.devices()[0].platform}")
    print(f"generate stage tokens/s (median): {statistics.median(ours):9.1f}")
    print(f"bare decode tokens/s    (median): {statistics.median(theirs):9.1f}")
    print(f"ratio stage/decode: median {statistics.median(ratios):.3f}, best {max(ratios):.3f}")
    print(f"load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")


if __name__ == "__main__":
    main()
