"""Subprocess helper for SFT tests that need their own device count or processes.

    python sft_worker.py sharded OUT.npz            # 8 simulated devices: one step sharded vs unsharded
    python sft_worker.py run RUN_DIR NPROC PID PORT # a short SFT run (maybe one of two processes)
"""

import os
import sys

mode = sys.argv[1]
if mode == "sharded":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
else:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // int(sys.argv[3])}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

TINY = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.05, bos_token_id=1, eos_token_id=2)


def sharded(out):
    from teams_rl_jax import sharding as shd
    from teams_rl_jax.models import init
    from teams_rl_jax.sft.config import OptimSection
    from teams_rl_jax.sft.step import TrainState, init_state, make_optimizer, make_train_step, opt_state_shardings

    lm = init(TINY, jax.random.key(21))  # fixed seeds: a failure replays
    rng = np.random.default_rng(22)
    batch = {"input_ids": rng.integers(3, 512, (8, 32)).astype(np.int32), "segment_ids": np.ones((8, 32), np.int32),
             "positions": np.tile(np.arange(32, dtype=np.int32), (8, 1)),
             "loss_mask": (rng.random((8, 32)) > 0.3).astype(np.int32)}
    opt = make_optimizer(OptimSection(lr=1e-2, warmup_steps=0, eps=1e-3), 10)  # eps: Adam maps any g~0 to +-lr
    step = make_train_step(lm, opt, grad_accum=2)
    s0 = init_state(lm, opt, 0)
    ref, m_ref = jax.jit(step)(s0, batch)

    mesh = shd.make_mesh(2, 2, 2)
    p_sh = shd.param_shardings(lm, mesh)
    rep = shd.replicated(mesh)
    o_sh = opt_state_shardings(opt, lm.params, p_sh, rep)
    s_sh = TrainState(step=rep, params=p_sh, opt_state=o_sh, rng=rep)
    lm2 = lm.replace(params=jax.device_put(lm.params, p_sh))
    s1 = init_state(lm2, opt, 0, o_sh)
    b_sh = shd.batch_sharding(mesh)
    with shd.activation_rules(mesh):
        got, m = jax.jit(step, in_shardings=(s_sh, b_sh), out_shardings=(s_sh, rep), donate_argnums=0)(
            s1, jax.device_put(batch, b_sh))
    P = jax.sharding.PartitionSpec
    # The declared layout, spelled out (vocab -> tensor, embed -> fsdp, heads/mlp -> tensor, layers stacked).
    want = {("embed_tokens", "embedding"): (P("tensor", "fsdp"), (256, 32)),
            ("layers", "self_attn", "q_proj", "kernel"): (P(None, "fsdp", "tensor"), (2, 32, 32)),
            ("layers", "mlp", "down_proj", "kernel"): (P(None, "tensor", "fsdp"), (2, 64, 32)),
            ("lm_head", "kernel"): (P("fsdp", "tensor"), (32, 256))}
    key = lambda path: tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))  # noqa: E731
    params = dict((key(path), x) for path, x in jax.tree_util.tree_leaves_with_path(got.params))
    moments = {}  # (mu|nu, param path) -> leaf
    for path, x in jax.tree_util.tree_leaves_with_path(got.opt_state):
        names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
        if names and names[-1] in ("mu", "nu"):
            moments[(names[-1], key(path))] = x
    assert {p for _, p in moments} == set(params), "every param has Adam moments"
    for name, (spec, shard) in want.items():
        for leaf in [params[name], moments[("mu", name)], moments[("nu", name)]]:
            # NamedSharding with exactly this spec, and every one of the 8 devices holds a [shard] block
            # (a replicated array on 8 devices has 8 shards too, but of the full shape).
            assert isinstance(leaf.sharding, jax.sharding.NamedSharding), (name, leaf.sharding)
            assert leaf.sharding.spec == spec, (name, leaf.sharding.spec, spec)
            assert len(leaf.addressable_shards) == 8 and {s.data.shape for s in leaf.addressable_shards} == {shard}, \
                (name, [s.data.shape for s in leaf.addressable_shards])
    # Every other moment is laid out exactly like its parameter (specs, not just device counts).
    for (_, name), x in moments.items():
        assert x.sharding.spec == params[name].sharding.spec, (name, x.sharding.spec, params[name].sharding.spec)
        assert x.addressable_shards[0].data.shape == params[name].addressable_shards[0].data.shape, name
    diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree_util.tree_leaves(ref.params), jax.tree_util.tree_leaves(got.params))]
    np.savez(out, param_diff=max(diffs), loss_diff=abs(float(m["loss"]) - float(m_ref["loss"])))
    print("OK")


def run(run_dir, nproc, pid, port):
    if nproc > 1:
        os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(nproc),
                          JAX_PROCESS_ID=str(pid))
    from teams_rl_jax.train import main

    sys.exit(main(["--stages", "sft", "--run-dir", run_dir, "--set", f"sft.model.config={TINY}",
                   "--set", "sft.max_steps=4", "--set", "sft.global_batch=4", "--set", "sft.data.max_seq_len=96",
                   "--set", "sft.checkpoint.every=2", "--set", "sft.export=false", "--set", "sft.optim.lr=3e-3",
                   "--set", "sft.tensorboard=false", "--set", "sft.peak_tflops=1.0"]))


if __name__ == "__main__":
    if mode == "sharded":
        sharded(sys.argv[2])
    else:
        run(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
