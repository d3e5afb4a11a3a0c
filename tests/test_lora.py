"""LoRA SFT: only adapters train, the adapter math equals a merged-weight reference, merged export equals the
adapter forward, and the PEFT adapter dir loads in peft + transformers with equal logits."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from teams_rl_jax.models import init, load_pretrained, save_pretrained
from teams_rl_jax.sft import lora
from teams_rl_jax.sft.config import LoraSection, OptimSection
from teams_rl_jax.sft.step import init_state, make_optimizer, make_train_step, token_losses

TINY = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1, bos_token_id=1, eos_token_id=2)


def _batch(rng, B=4, T=24, vocab=256):
    return {"input_ids": rng.integers(3, vocab, (B, T)).astype(np.int32), "segment_ids": np.ones((B, T), np.int32),
            "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
            "loss_mask": (rng.random((B, T)) > 0.3).astype(np.int32)}


def _random_adapters(adapters, seed, scale=0.1):
    """Non-zero A and B (a fresh adapter has B = 0, which would make every equality test trivial)."""
    leaves, tree = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [scale * jax.random.normal(k, x.shape, x.dtype)
                                               for k, x in zip(keys, leaves)])


def _merge_reference(lm, base, adapters):
    """Base params with W + (alpha/r) A B written in (float32), the textbook definition of a LoRA model."""
    s = lm.lora.alpha / lm.lora.rank
    out = jax.tree_util.tree_map(lambda x: x, base)
    for mod, ab in lora._flat_modules(adapters).items():
        node = out
        for k in mod:
            node = node[k]
        node["kernel"] = node["kernel"] + s * jnp.einsum("lir,lro->lio", ab["lora_a"], ab["lora_b"])
    return out


def test_lora_step_trains_only_adapters_and_matches_merged_gradient():
    """Catches: adapters missing from a projection (grad mismatch), a wrong alpha/r scale or A/B order in
    LoRADense (merged-reference loss/grad mismatch), the base reaching the optimizer or changing in a step."""
    seed = int(np.random.default_rng().integers(1 << 30))
    rng = np.random.default_rng(seed)
    spec = LoraSection(rank=4, alpha=8.0, dropout=0.0)
    lm = init(TINY, jax.random.key(seed)).replace(lora=spec)
    base = lm.params
    adapters = _random_adapters(lora.init_adapters(lm, spec, jax.random.key(seed + 1)), seed + 2)
    batch = _batch(rng)

    def ours(ad):
        t, c = token_losses(lm, {**base, **ad}, batch)
        return t / c

    def reference(ad):
        t, c = token_losses(lm.replace(lora=None), _merge_reference(lm, base, ad), batch)
        return t / c

    (l1, g1), (l2, g2) = (jax.jit(jax.value_and_grad(f))(adapters) for f in (ours, reference))
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5, err_msg=f"seed={seed}")
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=1e-6, err_msg=f"seed={seed}")

    opt = make_optimizer(OptimSection(lr=1e-2, warmup_steps=0), 10)
    state = init_state(lm.replace(params=adapters), opt, seed).replace(frozen=base)
    # The optimizer holds moments for adapters only: as many numbers as 2 x adapters (+ counters).
    n_opt = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim)
    assert n_opt == 2 * lora.num_params(adapters) < lm.num_params() // 4
    base_before = jax.tree_util.tree_map(np.asarray, base)
    step = jax.jit(make_train_step(lm, opt, grad_accum=2))
    new, m = step(state, batch)
    new, m2 = step(new, batch)
    for a, b in zip(jax.tree_util.tree_leaves(base_before), jax.tree_util.tree_leaves(new.frozen)):
        np.testing.assert_array_equal(a, np.asarray(b))  # the base is bit-for-bit unchanged
    changed = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree_util.tree_leaves(adapters), jax.tree_util.tree_leaves(new.params))]
    assert min(changed) > 0, (changed, seed)  # every adapter leaf moved
    assert float(m2["loss"]) < float(m["loss"]), (float(m["loss"]), float(m2["loss"]), seed)


def test_dropout_only_with_a_key():
    """Catches: dropout applied at evaluation (no key) or ignored in training (key given)."""
    spec = LoraSection(rank=4, alpha=8.0, dropout=0.5)
    lm = init(TINY, jax.random.key(0)).replace(lora=spec)
    params = {**lm.params, **_random_adapters(lora.init_adapters(lm, spec, jax.random.key(1)), 2)}
    ids = np.arange(3, 19, dtype=np.int32)[None]
    plain = np.asarray(jax.jit(lm.apply)(params, ids))
    no_drop = np.asarray(jax.jit(lm.replace(lora=LoraSection(rank=4, alpha=8.0, dropout=0.0)).apply)(params, ids))
    np.testing.assert_allclose(plain, no_drop, atol=1e-6)
    dropped = np.asarray(jax.jit(lambda p, k: lm.replace(lora_rng=k).apply(p, ids))(params, jax.random.key(3)))
    assert np.abs(dropped - plain).max() > 1e-4
    from teams_rl_jax.errors import CheckpointError

    with pytest.raises(CheckpointError, match="lora spec"):  # adapters in params but no spec: one-line error
        lm.replace(lora=None).apply(params, ids)


def test_merged_export_and_peft_adapter_match_adapter_forward(tmp_path):
    """Catches: a transposed or mis-named PEFT tensor, a wrong scale in the config or the merge, a
    target missing from target_modules, the merged export dropping the adapters."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hf_models import make_hf_model

    seed = int(np.random.default_rng().integers(1 << 30))
    torch_base, base_dir = make_hf_model(tmp_path, "llama3", seed=seed % 1000)
    spec = LoraSection(rank=4, alpha=16.0, dropout=0.1, targets=("q_proj", "v_proj", "o_proj", "down_proj"))
    lm = load_pretrained(base_dir).replace(lora=spec)
    adapters = _random_adapters(lora.init_adapters(lm, spec, jax.random.key(seed)), seed + 1, scale=0.2)
    ids = np.random.default_rng(seed).integers(3, 128, (2, 12))
    ours = np.asarray(jax.jit(lm.apply)({**lm.params, **adapters}, ids))
    assert np.abs(ours - np.asarray(lm.apply(lm.params, ids))).max() > 1e-2  # the adapters matter

    # 1) merged full weights, written in small shards, read back by us and by transformers
    merged_dir = save_pretrained(lm, tmp_path / "merged", params={**lm.params, **adapters}, max_shard_size="20KB")
    assert (merged_dir / "model.safetensors.index.json").is_file()
    np.testing.assert_allclose(np.asarray(load_pretrained(merged_dir).apply(load_pretrained(merged_dir).params, ids)),
                               ours, atol=2e-4, err_msg=f"seed={seed}")
    hf_merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        np.testing.assert_allclose(hf_merged(torch.as_tensor(ids)).logits.numpy(), ours, atol=2e-4,
                                   err_msg=f"seed={seed}")

    # 2) a PEFT adapter dir on the untouched base
    adapter_dir = lora.save_peft_adapter(lm, adapters, tmp_path / "adapter", base_model=str(base_dir))
    keys = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert keys["r"] == 4 and keys["lora_alpha"] == 16.0
    peft_model = PeftModel.from_pretrained(torch_base, adapter_dir).eval()
    with torch.no_grad():
        ref = peft_model(input_ids=torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ref, ours, atol=2e-4, err_msg=f"seed={seed}")
    # and our reader returns the same adapters
    back, spec2 = lora.load_peft_adapter(lm, adapter_dir)
    assert spec2.rank == 4 and set(spec2.targets) == set(spec.targets)
    for a, b in zip(jax.tree_util.tree_leaves(adapters), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))




@pytest.mark.slow  # two SFT runs (~30 s on a quiet 2-core machine); the pieces are tested above by default
def test_lora_sft_run_checkpoints_adapters_only_resumes_and_exports(tmp_path):
    """The SFT loop with lora.rank > 0 on a local HF dir: checkpoints hold adapters + their moments only, a
    second call resumes from them, and both exports (merged hf/ and PEFT adapter/) describe the same model.

    Catches: the frozen base written into every checkpoint, resume re-initialising the adapters, an export
    that forgets the adapters (merged == base) or disagrees with the adapter dir."""
    import orbax.checkpoint as ocp

    from teams_rl_jax import config as cfglib
    from teams_rl_jax.data.tokenizer import build_word_tokenizer
    from teams_rl_jax.sft.config import SFTConfig
    from teams_rl_jax.sft.loop import DEMO_DATA, train

    seed = int(np.random.default_rng().integers(1 << 30))
    base = tmp_path / "base"
    lm0 = init(dict(TINY, vocab_size=512), jax.random.key(seed))
    save_pretrained(lm0, base)
    build_word_tokenizer(DEMO_DATA.read_text().splitlines(), 512, save_dir=base)
    common = {"model": {"path": str(base)}, "global_batch": 2, "data": {"max_seq_len": 64, "path": str(DEMO_DATA)}, "tensorboard": False,
              "checkpoint": {"every": 1, "async_save": False}, "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.1},
              "optim": {"lr": 3e-2, "warmup_steps": 0, "schedule": "constant"}}
    logs = []
    train(cfglib.from_dict(SFTConfig, {**common, "max_steps": 2, "export": False}), tmp_path / "run", logs.append)
    ckpt = tmp_path / "run" / "sft" / "ckpt" / "2" / "state"
    saved = ocp.StandardCheckpointer().restore(ckpt)
    assert set(saved["params"]) == {"lora"} and not saved.get("frozen"), list(saved)
    n_saved = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(saved["params"]))
    assert n_saved < lm0.num_params() // 10

    state = train(cfglib.from_dict(SFTConfig, {**common, "max_steps": 3}), tmp_path / "run", logs.append)
    assert any("resumed from step 2" in m for m in logs), logs
    steps = [json.loads(l)["step"] for l in (tmp_path / "run" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    # the adapters continued from the checkpoint: step 3 moved them away from step 2's values
    for a, b in zip(jax.tree_util.tree_leaves(saved["params"]), jax.tree_util.tree_leaves(state.params)):
        assert a.shape == b.shape
    assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree_util.tree_leaves(saved["params"]), jax.tree_util.tree_leaves(state.params))) > 0

    out = tmp_path / "run" / "sft"
    lm = lm0.replace(lora=LoraSection(rank=4, alpha=8.0))
    adapters, _ = lora.load_peft_adapter(lm, out / "adapter")
    ids = np.arange(3, 40, dtype=np.int32)[None]
    with_adapter = np.asarray(jax.jit(lm.apply)({**lm0.params, **adapters}, ids))
    merged = load_pretrained(out / "hf")
    np.testing.assert_allclose(np.asarray(jax.jit(merged.apply)(merged.params, ids)), with_adapter, atol=1e-4,
                               err_msg=f"seed={seed}")
    assert np.abs(with_adapter - np.asarray(jax.jit(lm0.apply)(lm0.params, ids))).max() > 1e-3
    assert (out / "adapter" / "tokenizer_config.json").is_file() and (out / "hf" / "tokenizer_config.json").is_file()
