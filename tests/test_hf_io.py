"""Checkpoint export: dtype, transformers-style shards + index, one tensor gathered at a time; the warning for
a dimension the mesh cannot divide."""

import json
import warnings

import helpers
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from teams_rl_jax import sharding as shd
from teams_rl_jax.errors import CheckpointError
from teams_rl_jax.models import init, load_pretrained, save_pretrained
from teams_rl_jax.models import lm as lm_mod
from teams_rl_jax.models.hf_io import CheckpointReader, parse_size

TINY = dict(model_type="llama", vocab_size=200, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, bos_token_id=1, eos_token_id=2)


def test_bf16_sharded_export_one_tensor_at_a_time(tmp_path, monkeypatch):
    """Catches: gathering a whole stacked [L, ...] leaf (host peak = L tensors), casting after the gather
    (float32 bytes cross to the host), a shard over the limit, an index that misses a tensor, a stale
    single-file model.safetensors left to shadow the shards, layers split across out-of-order shards."""
    import torch
    from transformers import AutoModelForCausalLM

    seed = helpers.seed(402747741)  # once drawn at random: it put one logit 0.105 from the f32 model's
    lm = init(TINY, jax.random.key(seed))
    out = tmp_path / "hf"
    save_pretrained(lm, out)  # one float32 file first: must be replaced by the shards below
    assert (out / "model.safetensors").is_file()

    gathered = []
    real = lm_mod._host_array
    monkeypatch.setattr(lm_mod, "_host_array", lambda x: gathered.append((x.shape, x.dtype)) or real(x))
    limit = 12_000
    save_pretrained(lm, out, dtype="bfloat16", max_shard_size=limit)
    assert {np.dtype(d) for _, d in gathered} == {np.dtype(ml_dtypes.bfloat16)}  # cast on the device

    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    reader = CheckpointReader(out)
    assert set(index["weight_map"]) == set(reader.keys())
    # exactly one gather per written tensor, each of that tensor's shape (one layer, never a whole stack)
    assert sorted(tuple(sorted(sh)) for sh, _ in gathered) == sorted(tuple(sorted(reader.shape(n))) for n in reader.keys())
    sizes = {f: (out / f).stat().st_size for f in shards}
    for f in shards:  # over the limit only when a single tensor is bigger than it
        names = [n for n, s in index["weight_map"].items() if s == f]
        assert sizes[f] - 8 <= limit + 2000 or len(names) == 1, (f, names)
    assert index["metadata"]["total_size"] == sum(reader[n].nbytes for n in reader.keys())
    assert {str(reader[n].dtype) for n in reader.keys()} == {"bfloat16"}
    # whole layers in consecutive shards: along the shard order, the layer index never decreases
    layers = [[int(n.split(".")[2]) for n, s in index["weight_map"].items() if s == f and ".layers." in n] for f in shards]
    seq = [(min(x), max(x)) for x in layers if x]
    assert all(a[1] <= b[0] for a, b in zip(seq, seq[1:])), seq

    ids = np.random.default_rng(seed).integers(3, 200, (2, 9))
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with torch.no_grad():
        theirs = ref(torch.as_tensor(ids)).logits.numpy()
    back = load_pretrained(out)
    np.testing.assert_allclose(np.asarray(back.apply(back.params, ids)), theirs, atol=1e-4, err_msg=f"seed={seed}")
    # The export is exactly the weights rounded to bf16 (round-to-nearest, as on the device), checked
    # against that rounding rather than with a loose bound on how far bf16 moves the logits, which has no
    # fixed ceiling (0.105 for this seed).
    rounded = jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(p.dtype), lm.params)
    np.testing.assert_allclose(theirs, np.asarray(lm.apply(rounded, ids)), atol=1e-4, err_msg=f"seed={seed}")
    assert np.abs(theirs - np.asarray(lm.apply(lm.params, ids))).max() > 1e-3  # bf16 did round something


def test_shard_size_parsing():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    for bad in ("lots", "0GB", -5, "5 parsecs"):
        with pytest.raises(CheckpointError, match="shard size"):
            parse_size(bad)


def test_indivisible_dimension_warns_with_name_and_cost():
    """Catches: silently replicating vocab 32001 over tensor=4 (the warning must name the tensor, its dim and
    the per-device MiB), and warning for dimensions that do divide."""
    from teams_rl_jax.models.config import ModelConfig

    cfg = ModelConfig.from_dict(dict(TINY, vocab_size=32001, hidden_size=64))
    mesh = AbstractMesh((1, 2, 4), ("data", "fsdp", "tensor"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sh = shd.logical_to_sharding(lm_mod.logical_axes(cfg), mesh,
                                     shapes=jax.eval_shape(lambda: init(cfg, jax.random.key(0)).params))
    msgs = [str(w.message) for w in caught if issubclass(w.category, shd.ShardingWarning)]
    assert sorted(m.split()[1] for m in msgs) == ["embed_tokens/embedding", "lm_head/kernel"], msgs
    # [32001, 64] float32 over fsdp=2 only: 3.9 MiB per device instead of 1.0 MiB
    assert "size 32001" in msgs[0] and "+2.9 MiB per device" in msgs[0] and "pad it to 32004" in msgs[0], msgs[0]
    assert sh["embed_tokens"]["embedding"].spec == jax.sharding.PartitionSpec(None, "fsdp")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shd.logical_to_sharding(lm_mod.logical_axes(cfg.__class__.from_dict(dict(TINY, vocab_size=32000))), mesh,
                                shapes=jax.eval_shape(lambda: init(dict(TINY, vocab_size=32000), jax.random.key(0)).params))
    assert not [w for w in caught if issubclass(w.category, shd.ShardingWarning)]
