"""Logits parity of our Flax LM with transformers (torch) on tiny random checkpoints."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rng as seeded_rng
from helpers import seed as record_seed
from hf_models import VARIANTS, left_padded_batch, make_hf_model, torch_logits
from teams_rl_jax.errors import CheckpointError
from teams_rl_jax.models import load_pretrained, read_hf_config, save_pretrained

torch = pytest.importorskip("torch")


def _compare(lm, ref_model, rng, lengths=(9, 6, 3)):
    ids, mask, pos = left_padded_batch(rng, lengths, lm.config.vocab_size)
    ours = np.asarray(jax.jit(lm.apply)(lm.params, ids, mask, pos), np.float64)
    ref = torch_logits(ref_model, ids, mask, pos)
    valid = mask.astype(bool)
    assert np.std(ref[valid]) > 0.3, "logits too small for the comparison to mean anything"
    return np.max(np.abs(ours[valid] - ref[valid]))


@pytest.mark.parametrize("dialect", ["v4", "v5"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(tmp_path, variant, dialect):
    """Catches: a rope scaling type misread (llama3/linear), GQA head grouping, sliding window, qkv biases or
    tied embeddings dropped, a config dialect (4.x rope_scaling / 5.x rope_parameters) not understood."""
    base = 300 + 10 * sorted(VARIANTS).index(variant) + (dialect == "v5")
    ref, path = make_hf_model(tmp_path, variant, dialect, seed=record_seed(base, "weights"))
    lm = load_pretrained(path)
    cfg = read_hf_config(path)
    if variant == "llama3":
        assert cfg.rope_type == "llama3" and cfg.num_key_value_heads == 2
    assert cfg.tie_word_embeddings == (variant == "llama_linear_tied")
    err = _compare(lm, ref, seeded_rng(base + 5, "ids"))
    assert err <= 1e-4, f"{variant}/{dialect}: max abs diff {err}"


def test_save_pretrained_round_trip(tmp_path):
    import transformers

    ref, path = make_hf_model(tmp_path, "qwen2", "v5", seed=record_seed(401, "weights"))
    lm = load_pretrained(path)
    out = save_pretrained(lm, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    err = _compare(lm, reloaded, seeded_rng(402, "ids"))
    assert err <= 1e-4
    # and the export equals the original reference
    for (n1, p1), (n2, p2) in zip(sorted(ref.state_dict().items()), sorted(reloaded.state_dict().items())):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_sharded_bf16_checkpoint(tmp_path):
    import transformers

    _, path = make_hf_model(tmp_path, "llama3", "v5", dtype=torch.bfloat16, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("model-*.safetensors"))) > 2
    lm = load_pretrained(path, dtype="bfloat16", compute_dtype="float32")
    leaves = jax.tree_util.tree_leaves(lm.params)
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    # Same bf16 weights, computed in float32 on both sides (loading in float32 keeps torch's rope
    # tables in float32; casting a bf16 torch model with .float() would not).
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    err = _compare(lm, ref, seeded_rng(403, "ids"))
    assert err <= 1e-4


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = make_hf_model(tmp_path, "llama3")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_pretrained(path)


def test_shape_mismatch_names_both_shapes(tmp_path):
    _, path = make_hf_model(tmp_path, "llama3")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight.*\((96, 64|64, 96)\).*\((80, 64|64, 80)\)"):
        load_pretrained(path)


def test_unsupported_model_type_and_missing_path(tmp_path):
    _, path = make_hf_model(tmp_path, "llama3")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="gpt_neox"):
        load_pretrained(path)
    with pytest.raises(CheckpointError, match="does-not-exist"):
        load_pretrained(tmp_path / "does-not-exist")
