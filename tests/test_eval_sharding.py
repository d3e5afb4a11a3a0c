"""The log-likelihood scorer under a device mesh (8 simulated CPU devices: data 2 x fsdp 2 x tensor 2)
gives the single-device scores: params sharded by logical axes, rows over data*fsdp (batch rounded up
to a multiple of 4). Runs in a subprocess so the device count flag takes effect."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SEED = 7

CHILD = textwrap.dedent(f"""
    import jax, numpy as np
    from teams_rl_jax.models import init
    from teams_rl_jax.eval.multiple_choice import LoglikelihoodScorer, build_mesh
    assert jax.device_count() == 8
    lm = init(dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1,
                   eos_token_id=2, pad_token_id=0, initializer_range=0.2), jax.random.key({SEED}))
    rng = np.random.default_rng({SEED})
    reqs = [(list(rng.integers(3, 128, int(rng.integers(1, 40)))), list(rng.integers(3, 128, int(rng.integers(1, 6)))))
            for _ in range(11)]
    single = LoglikelihoodScorer(lm, batch_size=3, max_length=64, mesh=None).score_tokens(reqs)
    mesh = build_mesh(2, 2, 2)
    sharded = LoglikelihoodScorer(lm, batch_size=3, max_length=64, mesh=mesh)
    assert sharded.batch_size == 4
    got = sharded.score_tokens(reqs)
    a, b = np.array([s[0] for s in single]), np.array([s[0] for s in got])
    assert np.max(np.abs(a - b)) < 1e-4, (a, b)
    assert [s[1] for s in single] == [s[1] for s in got]
    specs = {{str(x.sharding.spec) for x in jax.tree_util.tree_leaves(sharded.params)}}
    assert any("tensor" in s or "fsdp" in s for s in specs), specs
    print("OK", float(np.max(np.abs(a - b))))
""")


def test_sharded_scorer_matches_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0 and "OK" in p.stdout, f"seed {SEED}\n{p.stdout}\n{p.stderr[-3000:]}"
