"""Run in a subprocess with 8 simulated CPU devices (see test_sharding.py).

Loads a checkpoint straight into a (data=2, fsdp=2, tensor=2) mesh and checks the sharded forward
and generate against the unsharded model. Prints 'OK <max diff>' on success.

The vocabulary (129) does not divide the tensor axis (2): the embedding's and lm_head's vocab dimension must
fall back to replicated (asserted, per-device shard shapes included) and the model must still compute the same.
"""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from teams_rl_jax import generate, sharding  # noqa: E402
from teams_rl_jax.models import init, load_pretrained, save_pretrained  # noqa: E402


def main(tmp: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    cfg = dict(model_type="llama", vocab_size=129, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
    ref = init(cfg, jax.random.key(31))  # fixed seeds: a failure replays
    save_pretrained(ref, tmp)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    lm = load_pretrained(tmp, mesh=mesh)

    # Parameters carry the declared shardings.
    want = sharding.param_shardings(lm, mesh)
    flat_p = jax.tree_util.tree_leaves_with_path(lm.params)
    flat_w = jax.tree_util.tree_leaves(want)
    for (path, p), w in zip(flat_p, flat_w):
        assert p.sharding.is_equivalent_to(w, p.ndim), (path, p.sharding, w)
    P = jax.sharding.PartitionSpec
    want = {  # path -> (spec, per-device shard shape)
        ("layers", "self_attn", "q_proj", "kernel"): (P(None, "fsdp", "tensor"), (2, 32, 32)),  # [L, 64/2, 64/2]
        ("layers", "self_attn", "k_proj", "kernel"): (P(None, "fsdp", "tensor"), (2, 32, 16)),  # 2 KV heads x 16
        ("layers", "mlp", "down_proj", "kernel"): (P(None, "tensor", "fsdp"), (2, 48, 32)),
        ("layers", "input_layernorm", "scale"): (P(None, None), (2, 64)),
        ("embed_tokens", "embedding"): (P(None, "fsdp"), (129, 32)),  # 129 % 2 != 0: vocab replicated
        ("lm_head", "kernel"): (P("fsdp", None), (32, 129)),
    }
    got = {tuple(k.key for k in path): x for path, x in flat_p}
    for name, (spec, shard) in want.items():
        x = got[name]
        assert isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.spec == spec, (name, x.sharding)
        shapes = [s.data.shape for s in x.addressable_shards]
        assert len(shapes) == 8 and set(shapes) == {shard}, (name, shapes)

    rng = np.random.default_rng(32)
    ids = rng.integers(3, 129, size=(4, 12))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    mask[3, :9] = 0
    expect = np.asarray(jax.jit(ref.apply)(ref.params, ids, mask))
    batch = sharding.batch_sharding(mesh)
    with sharding.activation_rules(mesh):
        fwd = jax.jit(lm.apply, in_shardings=(sharding.param_shardings(lm, mesh), batch, batch),
                      out_shardings=sharding.batch_sharding(mesh, 3))
        got = fwd(lm.params, jax.device_put(ids, batch), jax.device_put(mask, batch))
    assert got.sharding.spec[0] == ("data", "fsdp")
    valid = mask.astype(bool)
    assert expect[valid].std() > 0.3, "logits too small for the comparison to mean anything"
    err = float(np.max(np.abs(np.asarray(got)[valid] - expect[valid])))
    assert err <= 1e-5, err

    with sharding.activation_rules(mesh):
        out = generate(lm, lm.params, jax.device_put(ids, batch), jax.device_put(mask, batch), max_new_tokens=6,
                       rng=jax.random.key(0))
    want = np.asarray(generate(ref, ref.params, ids, mask, max_new_tokens=6, rng=jax.random.key(0)))
    # Greedy equality is only meaningful without near-ties: the top-2 gap on the unsharded greedy path must
    # dwarf the sharded/unsharded logits difference (err above), else an argmax flip would be noise.
    full = np.concatenate([ids, want], 1)
    fmask = np.concatenate([mask, np.ones_like(want)], 1)
    path_logits = np.asarray(jax.jit(ref.apply)(ref.params, full, fmask))[:, ids.shape[1] - 1:-1]
    top2 = np.sort(path_logits, -1)[..., -2:]
    margin = float((top2[..., 1] - top2[..., 0]).min())
    assert margin > max(1e-4, 100 * err), f"top-2 margin {margin:.2e} vs sharded logits diff {err:.2e}"
    np.testing.assert_array_equal(np.asarray(out), want)
    qlora_err = _check_qlora(ref, lm, mesh, ids, mask)
    print("OK", err, "margin", margin, "qlora", qlora_err)


def _check_qlora(ref, lm, mesh, ids, mask) -> float:
    """The NF4 base quantized on the mesh: the kernel's shardings, the same codes as on one device, and the
    same adapted forward. Block 32: down_proj's 96 inputs make 3 scale rows, which tensor=2 cannot split
    (that dim falls back to replicated)."""
    import warnings

    from teams_rl_jax.sft import lora
    from teams_rl_jax.sft.config import LoraSection

    spec = LoraSection(rank=4, alpha=8.0, dropout=0.0, quantize="nf4", quant_block=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sharding.ShardingWarning)
        frozen, _ = lora.quantize_base(lm.replace(lora=spec), spec, mesh)
    single, _ = lora.quantize_base(ref.replace(lora=spec), spec)
    P = jax.sharding.PartitionSpec
    q = frozen["layers"]["self_attn"]["q_proj"]
    assert q["kernel_nf4"].sharding.spec == P(None, "fsdp", "tensor"), q["kernel_nf4"].sharding
    assert q["kernel_absmax"].sharding.spec == P(None, "fsdp", "tensor"), q["kernel_absmax"].sharding
    assert {s.data.shape for s in q["kernel_nf4"].addressable_shards} == {(2, 16, 32)}  # [L, 64/2/2, 64/2]
    for a, b in zip(jax.tree_util.tree_leaves(frozen), jax.tree_util.tree_leaves(single)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    adapters = lora.init_adapters(ref.replace(lora=spec), spec, jax.random.key(33))
    adapters = jax.tree_util.tree_map(lambda x: x + 0.1, adapters)  # B != 0: the adapters take part
    model = ref.replace(lora=spec)
    expect = np.asarray(jax.jit(model.apply)({**single, **adapters}, ids, mask))
    with sharding.activation_rules(mesh):
        got = np.asarray(jax.jit(lm.replace(lora=spec).apply)({**frozen, **adapters}, ids, mask))
    valid = mask.astype(bool)
    err = float(np.max(np.abs(got[valid] - expect[valid])))
    assert err <= 1e-5, err
    return err


if __name__ == "__main__":
    main(sys.argv[1])
