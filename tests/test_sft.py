"""SFT: overfitting, packed = unpacked loss, accumulation, sharded step, kill/resume, errors, 2 processes."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import rng as seeded_rng
from helpers import seed as record_seed

from teams_rl_jax import config as cfglib
from teams_rl_jax.data import Example, pack_rows, tokenize_dataset, unpacked_rows
from teams_rl_jax.data.tokenizer import build_word_tokenizer
from teams_rl_jax.errors import ConfigError, TrainingError
from teams_rl_jax.models import init
from teams_rl_jax.sft.config import OptimSection, SFTConfig
from teams_rl_jax.sft.step import init_state, make_optimizer, make_train_step, token_losses

HERE = Path(__file__).parent
TINY = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.05, bos_token_id=1, eos_token_id=2)


def _seqs(rng, n, vocab=512):
    out = []
    for _ in range(n):
        k = int(rng.integers(6, 30))
        out.append((rng.integers(3, vocab, k).astype(np.int32), (np.arange(k) >= rng.integers(2, k)).astype(np.int32)))
    return out


def test_packed_equals_unpacked_summed_loss():
    """Catches: attention or loss crossing segment boundaries of a packed row (packed != unpacked)."""
    rng = seeded_rng(11)
    lm = init(TINY, jax.random.key(int(rng.integers(1 << 30))))
    seqs = _seqs(rng, 12)
    packed, plain = pack_rows(seqs, 64), unpacked_rows(seqs, 64)
    assert len(packed["input_ids"]) < len(plain["input_ids"])
    f = jax.jit(lambda b: token_losses(lm, lm.params, b))
    (tp, cp), (tu, cu) = f(packed), f(plain)
    assert float(cp) == float(cu) == sum(int(m[1:].sum()) for _, m in seqs)
    np.testing.assert_allclose(float(tp), float(tu), rtol=1e-5)


def test_grad_accumulation_equals_big_batch():
    """Catches: micro-batch losses averaged per micro-batch instead of over all loss tokens."""
    rng = seeded_rng(12)
    lm = init(TINY, jax.random.key(int(rng.integers(1 << 30))))
    batch = unpacked_rows(_seqs(rng, 8), 32)
    opt = make_optimizer(OptimSection(lr=1e-2, warmup_steps=0, eps=1e-3), 10)  # eps: Adam maps any g~0 to +-lr
    one, m1 = jax.jit(make_train_step(lm, opt, 1))(init_state(lm, opt, 0), batch)
    four, m4 = jax.jit(make_train_step(lm, opt, 4))(init_state(lm, opt, 0), batch)
    np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(four.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_step_loss_counts_only_response_tokens():
    """The step's loss and gradient are the cross-entropy of the response tokens only (loss_mask == 1),
    computed here independently from the model's logits.

    Catches: the step ignoring ``loss_mask`` (prompt tokens counted in the loss), targets not shifted by
    one, or the loss divided by the wrong token count.
    """
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    rng = seeded_rng(15)
    exs = [Example(f"say {' '.join(rng.choice(words, int(k)))}", " ".join(rng.choice(words, 4)))
           for k in rng.integers(3, 12, 6)]
    tok = build_word_tokenizer([e.instruction + " " + e.output for e in exs] +
                               ["Below is an instruction that describes a task. Write a response that appropriately "
                                "completes the request. ### Instruction: ### Response:"], 512)
    seqs, _ = tokenize_dataset(exs, tok, "alpaca", 96)
    batch = unpacked_rows(seqs, 96)
    lm = init(TINY, jax.random.key(record_seed(16, "init")))
    ids, mask, seg = batch["input_ids"], batch["loss_mask"], batch["segment_ids"]
    # The prompt is most of each row: counting it would move the loss a lot (asserted below).
    assert mask.sum() < 0.5 * (seg > 0).sum()

    def reference(params, weights):
        logp = jax.nn.log_softmax(lm.apply(params, ids, seg).astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp[:, :-1], jnp.asarray(ids[:, 1:, None]), axis=-1)[..., 0]
        return jnp.sum(nll * weights[:, 1:]) / jnp.sum(weights[:, 1:])

    ref_fn = jax.jit(jax.value_and_grad(reference))
    want, want_grad = ref_fn(lm.params, jnp.asarray(mask, jnp.float32))
    every, _ = ref_fn(lm.params, jnp.asarray(seg > 0, jnp.float32))  # what a mask-ignoring step computes
    assert abs(float(every) - float(want)) > 0.05, (float(every), float(want))
    opt = make_optimizer(OptimSection(lr=1e-3, warmup_steps=0, clip_norm=None), 10)
    _, m = jax.jit(make_train_step(lm, opt))(init_state(lm, opt, 0), batch)
    assert float(m["loss_tokens"]) == mask[:, 1:].sum()
    np.testing.assert_allclose(float(m["loss"]), float(want), rtol=1e-5)
    np.testing.assert_allclose(float(m["grad_norm"]), float(optax.global_norm(want_grad)), rtol=1e-4)


def test_schedule_and_decay_mask():
    from teams_rl_jax.sft.step import decay_mask, learning_rate_schedule

    lrs = [float(learning_rate_schedule(OptimSection(lr=2e-5, warmup_steps=2), 10)(i)) for i in range(10)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[1] == pytest.approx(2e-5)  # linear warm-up over 2 steps
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] < 0.05 * 2e-5  # then cosine decay
    params = {"embed_tokens": {"embedding": 0}, "norm": {"scale": 0},
              "layers": {"input_layernorm": {"scale": 0}, "self_attn": {"q_proj": {"kernel": 0, "bias": 0}}}}
    assert decay_mask(params) == {"embed_tokens": {"embedding": True}, "norm": {"scale": False},
                                  "layers": {"input_layernorm": {"scale": False},
                                             "self_attn": {"q_proj": {"kernel": True, "bias": False}}}}


def test_mixed_precision_keeps_float32_master_weights():
    rng = seeded_rng(13)
    lm = init(TINY, jax.random.key(int(rng.integers(1 << 30))), dtype="float32", compute_dtype="bfloat16")
    batch = unpacked_rows(_seqs(rng, 4), 32)
    opt = make_optimizer(OptimSection(lr=1e-3, warmup_steps=0), 10)
    state, m = jax.jit(make_train_step(lm, opt))(init_state(lm, opt, 0), batch)
    dtypes = {x.dtype for x in jax.tree_util.tree_leaves((state.params, state.opt_state)) if x.ndim}
    assert dtypes == {jnp.dtype(jnp.float32)}  # params and Adam moments stay float32
    total, count = token_losses(lm.replace(dtype=jnp.float32), lm.params, batch)
    np.testing.assert_allclose(float(m["loss"]), float(total / count), rtol=2e-2)  # bf16 compute, f32 loss


def test_tiny_model_overfits_16_examples():
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
    rng = seeded_rng(0)
    exs = [Example(f"say item {i}", " ".join(rng.choice(words, 6))) for i in range(16)]
    tok = build_word_tokenizer([e.instruction + " " + e.output for e in exs] +
                               ["Below is an instruction that describes a task. Write a response that appropriately "
                                "completes the request. ### Instruction: ### Response:"], 512)
    seqs, _ = tokenize_dataset(exs, tok, "alpaca", 64)
    batch = pack_rows(seqs, 256)
    lm = init(TINY, jax.random.key(0))
    opt = make_optimizer(OptimSection(lr=1e-2, warmup_steps=5, schedule="constant"), 60)
    step = jax.jit(make_train_step(lm, opt))
    state = init_state(lm, opt, 0)
    for _ in range(60):  # ~1e-3 after 60 steps; 0.15 after 30
        state, m = step(state, batch)
    # Random outputs of 6 words from 16 (+EOS): chance level is ~ln(16) = 2.77 nats per token.
    assert float(m["loss"]) < 0.1, float(m["loss"])


def test_sharded_step_equals_unsharded(tmp_path):
    """One step on a (data=2, fsdp=2, tensor=2) mesh of 8 simulated devices equals the unsharded step; the
    worker asserts each param's and Adam moment's NamedSharding spec and per-device shard shape.

    Catches: moments left replicated (or laid out unlike their params), a param rule mapped to the wrong mesh
    axis, a sharded step that computes something else.
    """
    out = tmp_path / "r.npz"
    p = subprocess.run([sys.executable, str(HERE / "sft_worker.py"), "sharded", str(out)], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = np.load(out)
    assert float(r["param_diff"]) <= 1e-5 and float(r["loss_diff"]) <= 1e-5, dict(r)


def _run(run_dir, nproc=1, pid=0, port=0, env=None):
    """Start ``sft_worker.py run`` (the train CLI on a tiny config) in a subprocess."""
    return subprocess.Popen([sys.executable, str(HERE / "sft_worker.py"), "run", str(run_dir), str(nproc), str(pid),
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def _wait(proc, timeout=600) -> tuple[int, str]:
    """Exit status and stderr tail (reading the pipes, so a chatty child cannot block on a full pipe)."""
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err[-3000:]


def _losses(run_dir):
    rows = [json.loads(l) for l in (Path(run_dir) / "sft" / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def test_kill_and_resume_is_exact(tmp_path):
    # The runs share a persistent compilation cache: later processes load the step instead of compiling it.
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    rc, err = _wait(_run(tmp_path / "full", env=cache))
    assert rc == 0, err
    rc, err = _wait(_run(tmp_path / "resumed", env={**cache, "TEAMS_RL_JAX_KILL_AFTER_CHECKPOINT": "2"}))
    assert rc == -9, err  # SIGKILL right after the step-2 checkpoint was committed
    steps, _ = _losses(tmp_path / "resumed")
    assert steps == [1, 2]
    rc, err = _wait(_run(tmp_path / "resumed", env=cache))
    assert rc == 0, err
    s_full, l_full = _losses(tmp_path / "full")
    s_res, l_res = _losses(tmp_path / "resumed")
    assert s_full == s_res == [1, 2, 3, 4]
    assert l_full == l_res  # bit for bit
    row = json.loads((tmp_path / "full" / "sft" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu"} <= set(row), row
    assert row["tokens"] > 0 and 0 < row["mfu"] and row["lr"] > 0


def test_two_processes_equal_one(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one = _run(tmp_path / "one")
    procs = [_run(tmp_path / "two", 2, i, port) for i in range(2)]
    for p in [one] + procs:
        rc, err = _wait(p)
        assert rc == 0, err
    s1, l1 = _losses(tmp_path / "one")
    s2, l2 = _losses(tmp_path / "two")
    assert s1 == s2 == [1, 2, 3, 4]  # one metrics line per step: only process 0 writes
    np.testing.assert_allclose(l1, l2, rtol=1e-5)


def test_nan_stops_with_step_and_keeps_checkpoint(tmp_path):
    from teams_rl_jax.sft.loop import train

    cfg = cfglib.from_dict(SFTConfig, {"model": {"config": TINY}, "max_steps": 5, "global_batch": 4,
                                       "data": {"max_seq_len": 96}, "export": False, "tensorboard": False,
                                       "checkpoint": {"every": 1},
                                       "optim": {"lr": 1e35, "clip_norm": None, "warmup_steps": 0}})
    with pytest.raises(TrainingError, match=r"non-finite loss or gradient at step (\d+)") as err:
        train(cfg, tmp_path, log=lambda m: None)
    bad_step = int(re.search(r"at step (\d+)", str(err.value)).group(1))
    ckpts = sorted(int(p.name) for p in (tmp_path / "sft" / "ckpt").iterdir() if p.name.isdigit())
    assert ckpts and ckpts[-1] == bad_step - 1, (ckpts, bad_step)  # the last good checkpoint remains
    import orbax.checkpoint as ocp

    saved = ocp.StandardCheckpointer().restore(tmp_path / "sft" / "ckpt" / str(ckpts[-1]) / "state")
    assert int(saved["step"]) == ckpts[-1]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(saved["params"]))


def test_finetune_local_checkpoint_exports_for_transformers(tmp_path):
    """model.path route: load a local HF dir, train, export safetensors + tokenizer; transformers serves it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from teams_rl_jax.models import save_pretrained
    from teams_rl_jax.sft.loop import DEMO_DATA, train

    base = tmp_path / "base"
    lm0 = init(TINY, jax.random.key(record_seed(14, "init")))
    save_pretrained(lm0, base)
    build_word_tokenizer(DEMO_DATA.read_text().splitlines(), 512, save_dir=base)
    # data.path explicit: with a real checkpoint (model.path), 'auto' without a generated dataset is an error.
    cfg = cfglib.from_dict(SFTConfig, {"model": {"path": str(base)}, "max_steps": 2, "global_batch": 2,
                                       "data": {"max_seq_len": 96, "path": str(DEMO_DATA)}, "optim": {"lr": 1e-2}})
    state = train(cfg, tmp_path / "run", log=lambda m: None)
    out = tmp_path / "run" / "sft"
    assert list((out / "tb").iterdir()) and len((out / "metrics.jsonl").read_text().splitlines()) == 2
    tok = AutoTokenizer.from_pretrained(out / "hf")
    ref = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    ids = tok("Name three primary colors.", return_tensors="np")["input_ids"]
    with torch.no_grad():
        exported = ref(torch.as_tensor(ids)).logits.numpy()
    apply = jax.jit(lm0.apply)
    np.testing.assert_allclose(np.asarray(apply(state.params, ids)), exported, atol=1e-4)
    # the export holds the trained weights, not the initial ones
    assert np.abs(np.asarray(apply(lm0.params, ids)) - exported).max() > 1e-3


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="optim.lrr"):
        cfglib.from_dict(SFTConfig, {"optim": {"lrr": 1.0}})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n{oops\n")
    p = subprocess.run([sys.executable, "-m", "teams_rl_jax.sft", "--run-dir", str(tmp_path / "r"),
                        "--set", f"data.path={bad}"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and f"{bad}:2: invalid JSON" in p.stderr, p.stderr
    p = subprocess.run([sys.executable, "-m", "teams_rl_jax.sft", "--set", "optim.bogus=1"], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2 and "optim.bogus" in p.stderr and p.stderr.count("\n") == 1, p.stderr
