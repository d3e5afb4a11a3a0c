"""QLoRA's 4-bit NormalFloat base (``models.nf4``, ``sft.lora.quantize_base``, ``lora.quantize: nf4``).

References: the NF4 levels from scipy's normal quantiles (QLoRA's construction); bit-for-bit codes and
scales from ``bitsandbytes.functional.quantize_4bit``; the adapted model's logits from ``transformers`` +
``bitsandbytes`` (``BitsAndBytesConfig(load_in_4bit, nf4)``) + ``peft`` on the same checkpoint and adapters.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from teams_rl_jax.models import init, load_pretrained, nf4, save_pretrained
from teams_rl_jax.sft import lora
from teams_rl_jax.sft.config import LoraSection, OptimSection
from teams_rl_jax.sft.step import init_state, make_optimizer, make_train_step, token_losses

# intermediate 128: every projection's input dim is a multiple of the 64-weight block
TINY = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1, bos_token_id=1, eos_token_id=2)


def _seed() -> int:
    return int(np.random.default_rng().integers(1 << 30))


def _random_adapters(adapters, seed, scale=0.1):
    """Non-zero A and B (a fresh adapter has B = 0)."""
    leaves, tree = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [scale * jax.random.normal(k, x.shape, x.dtype)
                                               for k, x in zip(keys, leaves)])


def _dequantized(frozen) -> dict:
    """The quantized base written back as plain float32 kernels: the dense model QLoRA actually trains."""
    flat = {tuple(k.key for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(frozen)[0]}
    out: dict = {}
    for path, v in nf4.pack_params(flat).items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = nf4.dequantize(v.codes, v.absmax) if isinstance(v, nf4.Packed) else v
    return out


def test_levels_are_the_normal_quantiles_of_qlora():
    """Catches: a mistyped level (the table is data; this rebuilds it from QLoRA's recipe, appendix E)."""
    from scipy.stats import norm

    # QLoRA's outermost quantile, 0.9677083 (~ 1 - (1/32 + 1/30) / 2, rounded as the paper's code has it)
    top = 0.9677083
    pos = norm.ppf(np.linspace(top, 0.5, 9)[:-1])  # 8 positive levels
    neg = -norm.ppf(np.linspace(top, 0.5, 8)[:-1])  # 7 negative levels
    levels = np.sort(np.concatenate([pos, [0.0], neg]))
    levels = levels / np.abs(levels).max()
    np.testing.assert_allclose(nf4.NF4_LEVELS, levels, atol=1e-7)
    assert nf4.NF4_LEVELS[7] == 0.0 and np.all(np.diff(nf4.NF4_LEVELS) > 0.07)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantize_equals_bitsandbytes_bit_for_bit(dtype):
    """Catches: blocks along the wrong axis, swapped nibbles, dividing instead of multiplying by the reciprocal
    (near-ties round differently), a wrong scale or level in dequantize."""
    import torch
    import bitsandbytes.functional as bnbf

    seed = _seed()
    rng = np.random.default_rng(seed)
    n_in, n_out = 320, 96
    w = (0.02 * rng.standard_normal((n_in, n_out))).astype(np.float32)
    w[64:128, 5] = 0.0  # an all-zero block: absmax 0, every code the zero level
    w[200, 7] = 0.9  # an outlier dominating its block
    w_j = jnp.asarray(w, dtype)
    codes, absmax = jax.jit(nf4.quantize)(w_j)
    assert codes.shape == (n_in // 2, n_out) and codes.dtype == jnp.uint8 and absmax.shape == (n_in // 64, n_out)
    # bitsandbytes quantizes torch's [out, in] layout (flattened, 64-weight blocks along in)
    w_t = torch.from_numpy(np.ascontiguousarray(np.asarray(w_j.astype(jnp.float32)).T))
    ref_codes, state = bnbf.quantize_4bit(w_t.to(getattr(torch, dtype)), blocksize=64, quant_type="nf4")
    ours_flat = np.asarray(codes).T.reshape(-1)
    mismatch = np.flatnonzero(ours_flat != ref_codes.numpy().reshape(-1))
    assert mismatch.size == 0, f"seed={seed}: {mismatch.size} codes differ (first bytes {mismatch[:5]})"
    np.testing.assert_array_equal(np.asarray(absmax).T.reshape(-1), state.absmax.numpy(), err_msg=f"seed={seed}")
    # in the weights' dtype, as bitsandbytes returns it (level x absmax in float32, then one rounding)
    same = np.asarray(nf4.dequantize(codes, absmax, w_j.dtype).astype(jnp.float32))
    np.testing.assert_array_equal(same.T, bnbf.dequantize_4bit(ref_codes, state).float().numpy(),
                                  err_msg=f"seed={seed}")
    back = np.asarray(nf4.dequantize(codes, absmax))
    assert np.all(back[64:128, 5] == 0.0)
    # the error bound of blockwise absmax quantization: half the widest level gap times the block's absmax
    gap = np.diff(nf4.NF4_LEVELS).max() / 2
    bound = gap * np.repeat(np.asarray(absmax), 64, axis=0) * (1 + 1e-6)
    assert np.all(np.abs(back - np.asarray(w_j.astype(jnp.float32))) <= bound), f"seed={seed}"
    # a stacked [L, in, out] kernel quantizes layer by layer to the same codes
    c2, a2 = nf4.quantize(jnp.stack([w_j, -w_j]))
    np.testing.assert_array_equal(np.asarray(c2[0]), np.asarray(codes))


@pytest.mark.parametrize("variant", ["llama3", "qwen2"])
def test_qlora_forward_equals_transformers_bitsandbytes_peft(tmp_path, variant):
    """Our NF4 base + adapters against transformers' ``load_in_4bit`` (nf4, block 64, float32 compute) with the
    same adapters loaded by peft. Catches: a layer left unquantized or quantized twice, the head or embeddings
    quantized (bitsandbytes keeps them), a quantized layer dropping its bias (qwen2's q/k/v), a PEFT export
    that disagrees with the quantized forward."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from hf_models import make_hf_model

    seed = _seed()
    _, base_dir = make_hf_model(tmp_path, variant, seed=seed % 1000, intermediate_size=128)
    spec = LoraSection(rank=4, alpha=8.0, dropout=0.0, quantize="nf4", targets=("q_proj", "v_proj", "down_proj"))
    lm = load_pretrained(base_dir).replace(lora=spec)
    frozen, _ = lora.quantize_base(lm, spec)
    adapters = _random_adapters(lora.init_adapters(lm, spec, jax.random.key(seed)), seed + 1, scale=0.2)
    ids = np.random.default_rng(seed).integers(3, 128, (2, 12))
    ours = np.asarray(jax.jit(lm.apply)({**frozen, **adapters}, ids))
    full = np.asarray(jax.jit(lm.replace(lora=None).apply)(lm.params, ids))

    adapter_dir = lora.save_peft_adapter(lm, adapters, tmp_path / "adapter", base_model=str(base_dir))
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_blocksize=64,
                           bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=False)
    hf = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=q, device_map="cpu")
    hf = PeftModel.from_pretrained(hf, adapter_dir)
    # train mode (no dropout in this model, lora_dropout 0): bitsandbytes' CPU *inference* path repacks the
    # weights for a bf16 AVX-512 kernel (~3e-2 off here); training mode dequantizes and runs a float32 GEMM,
    # the computation QLoRA trains with.
    hf.train()
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, err_msg=f"seed={seed}")
    assert np.abs(ours - full).max() > 1e-2, f"seed={seed}: quantization should be visible"


def test_qlora_gradient_equals_lora_on_the_dequantized_base_and_a_step_trains_only_adapters():
    """Catches: a wrong input-gradient in ``nf4.matmul``'s custom VJP (grads differ from autodiff through the
    dequantized dense model), codes or scales receiving updates, the quantized base changing in a step."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    spec = LoraSection(rank=4, alpha=8.0, dropout=0.0, quantize="nf4")
    lm = init(TINY, jax.random.key(seed)).replace(lora=spec)
    frozen, _ = lora.quantize_base(lm, spec)
    dense = _dequantized(frozen)
    adapters = _random_adapters(lora.init_adapters(lm, spec, jax.random.key(seed + 1)), seed + 2)
    B, T = 4, 24
    batch = {"input_ids": rng.integers(3, 256, (B, T)).astype(np.int32), "segment_ids": np.ones((B, T), np.int32),
             "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
             "loss_mask": (rng.random((B, T)) > 0.3).astype(np.int32)}
    plain = lm.replace(lora=LoraSection(rank=4, alpha=8.0, dropout=0.0))

    def loss(model, base):
        return lambda ad: (lambda t, c: t / c)(*token_losses(model, {**base, **ad}, batch))

    (l1, g1), (l2, g2) = (jax.jit(jax.value_and_grad(loss(m, b)))(adapters)
                          for m, b in ((lm, frozen), (plain, dense)))
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5, err_msg=f"seed={seed}")
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=1e-6, err_msg=f"seed={seed}")

    opt = make_optimizer(OptimSection(lr=1e-2, warmup_steps=0), 10)
    state = init_state(lm.replace(params=adapters), opt, seed).replace(frozen=frozen)
    before = jax.tree_util.tree_map(np.asarray, frozen)
    step = jax.jit(make_train_step(lm, opt))
    new, m = step(state, batch)
    new, m2 = step(new, batch)
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(new.frozen)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert float(m2["loss"]) < float(m["loss"]), (float(m["loss"]), float(m2["loss"]), seed)


def test_backward_keeps_codes_not_dequantized_weights():
    """Under the layer scan, the backward must not stack every layer's dequantized W as residuals (that is a
    full-precision copy of the base: what NF4 exists to avoid). A weight-heavy model, 8 tokens: XLA's temp
    memory for the adapters' gradient stays well under the dequantized stack's bytes. Catches: replacing
    ``nf4.matmul``'s custom VJP by plain autodiff of ``x @ dequantize(...)``."""
    cfg = dict(TINY, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, vocab_size=128)
    spec = LoraSection(rank=2, alpha=4.0, dropout=0.0, quantize="nf4")
    lm = init(cfg, jax.random.key(0)).replace(lora=spec)
    frozen, _ = lora.quantize_base(lm, spec)
    adapters = lora.init_adapters(lm, spec, jax.random.key(1))
    ids = jnp.arange(3, 11, dtype=jnp.int32)[None]
    batch = {"input_ids": ids, "segment_ids": jnp.ones_like(ids), "positions": jnp.arange(8, dtype=jnp.int32)[None],
             "loss_mask": jnp.ones_like(ids)}
    grad = jax.jit(jax.grad(lambda ad, base: token_losses(lm, {**base, **ad}, batch)[0]))
    temp = grad.lower(adapters, frozen).compile().memory_analysis().temp_size_in_bytes
    stack = sum(int(np.prod(v.shape)) * 4 for v in nf4.pack_params(
        {tuple(k.key for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(frozen)[0]}).values()
        if isinstance(v, nf4.Packed))
    assert temp < 0.5 * stack, (temp, stack)


def test_bad_shapes_and_config_name_the_tensor_or_key():
    """One-line errors: an input dim the block does not divide (names the tensor), an odd block, nf4 without
    adapters (name the key)."""
    from teams_rl_jax import config as cfglib
    from teams_rl_jax.errors import CheckpointError, ConfigError
    from teams_rl_jax.sft.config import SFTConfig

    spec = LoraSection(rank=2, quantize="nf4")
    lm = init(dict(TINY, intermediate_size=96), jax.random.key(0)).replace(lora=spec)
    with pytest.raises(CheckpointError, match=r"layers/mlp/down_proj/kernel.*\(96\).*block size 64"):
        lora.quantize_base(lm, spec)
    with pytest.raises(ConfigError, match="quant_block"):
        cfglib.from_dict(SFTConfig, {"lora": {"rank": 2, "quantize": "nf4", "quant_block": 63}})
    with pytest.raises(ConfigError, match="rank > 0"):
        cfglib.from_dict(SFTConfig, {"lora": {"quantize": "nf4"}})
    with pytest.raises(ConfigError, match="quantize"):
        cfglib.from_dict(SFTConfig, {"lora": {"rank": 2, "quantize": "int3"}})


def test_qlora_sft_run_exports_the_trained_model(tmp_path):
    """The SFT loop with ``lora.quantize: nf4`` on a local HF dir: the log reports the 4-bit base, the
    checkpoint holds only adapters, and the merged export (adapters added to the *dequantized* base) gives the
    logits of the quantized model with the exported PEFT adapter. Catches: the loop training the bf16 base
    instead of the quantized one, the merge reading a missing ``kernel`` or merging into the wrong base."""
    import orbax.checkpoint as ocp

    from teams_rl_jax import config as cfglib
    from teams_rl_jax.data.tokenizer import build_word_tokenizer
    from teams_rl_jax.sft.config import SFTConfig
    from teams_rl_jax.sft.loop import DEMO_DATA, train

    seed = _seed()
    base = tmp_path / "base"
    lm0 = init(dict(TINY, vocab_size=512), jax.random.key(seed))
    save_pretrained(lm0, base)
    build_word_tokenizer(DEMO_DATA.read_text().splitlines(), 512, save_dir=base)
    lora_cfg = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "quantize": "nf4"}
    cfg = cfglib.from_dict(SFTConfig, {
        "model": {"path": str(base)}, "global_batch": 2, "max_steps": 2, "tensorboard": False,
        "data": {"max_seq_len": 64, "path": str(DEMO_DATA)}, "checkpoint": {"every": 2, "async_save": False},
        "lora": lora_cfg, "optim": {"lr": 3e-2, "warmup_steps": 0, "schedule": "constant"}})
    logs = []
    state = train(cfg, tmp_path / "run", logs.append)
    assert any("quantized to NF4" in m for m in logs), logs
    leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(state.frozen)[0]}
    assert not any(k.endswith("['kernel']") and "layers" in k for k in leaves), "a projection kept its dense kernel"
    assert sum(x.dtype == jnp.uint8 for x in leaves.values()) == 7, "the run did not train against the 4-bit base"
    saved = ocp.StandardCheckpointer().restore(tmp_path / "run" / "sft" / "ckpt" / "2" / "state")
    assert set(saved["params"]) == {"lora"} and not saved.get("frozen")

    out = tmp_path / "run" / "sft"
    spec = LoraSection(**lora_cfg)
    lm = lm0.replace(lora=spec)
    frozen, _ = lora.quantize_base(lm, spec)
    adapters, _ = lora.load_peft_adapter(lm, out / "adapter")
    ids = np.arange(3, 40, dtype=np.int32)[None]
    trained = np.asarray(jax.jit(lm.apply)({**frozen, **adapters}, ids))
    merged = load_pretrained(out / "hf")
    np.testing.assert_allclose(np.asarray(jax.jit(merged.apply)(merged.params, ids)), trained, atol=1e-4,
                               err_msg=f"seed={seed}")
    untrained = np.asarray(jax.jit(lm.apply)({**frozen, **jax.tree_util.tree_map(jnp.zeros_like, adapters)}, ids))
    assert np.abs(trained - untrained).max() > 1e-3, f"seed={seed}: the adapters did not train"
