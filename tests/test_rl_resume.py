"""Policy-stage checkpoints: a run killed with SIGKILL resumes from its last saved update, and on
the token-edit env the resumed run equals an uninterrupted one exactly (params and curves).

The mutation each test catches is in its docstring (also listed in tests/README.md).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from teams_rl_jax.errors import CheckpointError
from teams_rl_jax.rl import PolicyConfig
from teams_rl_jax.rl.checkpoint import load_policy
from teams_rl_jax.rl.stage import run_policy_stage

SEED = 3
CHILD = textwrap.dedent("""
    import os, signal, sys
    from teams_rl_jax.rl import PolicyConfig, PPOConfig
    from teams_rl_jax.rl.stage import run_policy_stage

    run_dir, kill_at = sys.argv[1], int(sys.argv[2])
    cfg = PolicyConfig(algo="ppo", env="token_edit", num_envs=8, num_steps=6, num_updates=6, save_every=2,
                       hidden_sizes=(16,), ppo=PPOConfig(lr=3e-3, num_minibatches=2), compare=(), seed={seed})

    def log(msg):
        print(msg, flush=True)
        if kill_at and msg.endswith(f"saved state at update {{kill_at}}"):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: as a crash or OOM kill

    run_policy_stage(cfg, run_dir, log=log)
""").format(seed=SEED)


def _child(run_dir, kill_at, cache):
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", CHILD, str(run_dir), str(kill_at)], env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow  # three child processes: ~40 s on 16 idle cores, minutes on a busy 2-core runner
def test_policy_stage_resumes_exactly_after_kill_9(tmp_path):
    """Mutations caught: the optimiser state, key or update counter not saved/restored (the resumed
    run then differs from the uninterrupted one), the curves of the first run lost on resume,
    resuming from a step whose save was not finished, ignoring the saved state (restarting from 0)."""
    cache = tmp_path / "xla_cache"  # the three runs compile the same programs once
    full = _child(tmp_path / "full", 0, cache)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _child(tmp_path / "resumed", 4, cache)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "saved state at update 4" in killed.stdout and "wrote" not in killed.stdout
    resumed = _child(tmp_path / "resumed", 0, cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from update 4" in resumed.stdout, resumed.stdout
    assert "update 1/6" not in resumed.stdout  # updates 1-4 were not run again

    a = (tmp_path / "full" / "policy" / "curves.jsonl").read_text().splitlines()
    b = (tmp_path / "resumed" / "policy" / "curves.jsonl").read_text().splitlines()
    assert [json.loads(x)["update"] for x in b] == [1, 2, 3, 4, 5, 6]
    assert a == b, f"seed {SEED}: curves differ"
    _, pa, _ = load_policy(tmp_path / "full")
    _, pb, _ = load_policy(tmp_path / "resumed")
    for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"seed {SEED}")


def test_resume_refuses_a_different_config(tmp_path):
    """Mutation caught: resuming a saved state under a changed config (another algorithm, env or
    learning rate), which would silently mix two runs."""
    cfg = PolicyConfig(algo="random", env="synthetic", num_envs=4, num_updates=2, save_every=1, compare=(), seed=SEED)
    run_policy_stage(cfg, tmp_path, log=lambda s: None)
    with pytest.raises(CheckpointError, match="different policy config"):
        run_policy_stage(cfg.replace(gamma=0.9), tmp_path, log=lambda s: None)
    # a longer run of the same config continues from the saved updates
    logs = []
    run_policy_stage(cfg.replace(num_updates=3), tmp_path, log=logs.append)
    assert any("resumed from update 2" in line for line in logs)
    rows = (tmp_path / "policy" / "curves.jsonl").read_text().splitlines()
    assert len(rows) == 3
