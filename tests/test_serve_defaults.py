"""Serving defaults that follow the checkpoint: BOS as the tokenizer adds it, ``--dtype auto``.

* ``FlaxBackend.encode`` puts before the text exactly what ``tokenizer(text)`` (default
  ``add_special_tokens=True``) would: Llama's BOS, nothing for a Qwen2-like tokenizer or one loaded with
  ``add_bos_token=False``, and never a second BOS after a chat template that wrote one.
* ``python -m teams_rl_jax.serve`` without ``--dtype`` loads the weights in the checkpoint's own dtype
  (config.json ``dtype`` / ``torch_dtype``; float32 if it names none), as vLLM's ``--dtype auto`` does.

Mutations tried (each made a test here fail):
  1. ``encode`` back to "prepend BOS whenever the text lacks it" -> test_no_bos_when_tokenizer_adds_none.
  2. ``encode`` prepends the front specials even when the text starts with them -> test_one_bos_*.
  3. ``front_special_ids`` returns ``()`` always -> test_one_bos_llama_style.
  4. ``front_special_ids`` returns the whole special list (probe's trailing EOS counted as front) ->
     test_trailing_specials_are_not_front.
  5. ``--dtype`` default back to ``bfloat16`` -> test_dtype_auto_follows_checkpoint (float32 case).
  6. ``resolve_dtype`` ignores ``torch_dtype`` -> test_dtype_auto_follows_checkpoint (4.x case).
  7. ``resolve_dtype`` ignores an explicit ``--dtype`` -> test_explicit_dtype_wins.
  8. the env's ``_with_bos`` back to "always BOS" -> test_env_prompts_follow_the_same_rule.
"""

import json
import sys
from pathlib import Path

import helpers
import jax
import jax.numpy as jnp
import pytest
import tokenizer_fixtures as tf

from teams_rl_jax.backends.flax_backend import FlaxBackend
from teams_rl_jax.data.tokenizer import front_special_ids
from teams_rl_jax.errors import ConfigError
from teams_rl_jax.models import init, save_pretrained
from teams_rl_jax.serve.__main__ import build_app, build_parser, resolve_dtype

TEXT = "Name three primary colors."


@pytest.fixture(scope="module")
def tiny_lm():
    return init({"model_type": "llama", "vocab_size": 2048, "hidden_size": 16, "intermediate_size": 32,
                 "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                 "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2}, jax.random.key(0))


def _backend(lm, tok):
    return FlaxBackend.from_lm(lm, tok, role="serve", chat=False)


def test_no_bos_when_tokenizer_adds_none(tiny_lm, tmp_path):
    """Qwen2-like (no post-processor) and a Llama tokenizer loaded with ``add_bos_token=False``: no BOS."""
    from transformers import AutoTokenizer

    qwen_like = helpers.make_tokenizer(tmp_path / "plain", vocab_size=300)
    assert qwen_like.bos_token_id == 1 and qwen_like(TEXT)["input_ids"][0] != 1
    b = _backend(tiny_lm, qwen_like)
    assert b.front_ids == () and b.encode(TEXT) == qwen_like(TEXT)["input_ids"]
    assert 1 not in b.encode(TEXT)

    spm = tf.llama2_spm_tokenizer(tmp_path / "spm")
    off = AutoTokenizer.from_pretrained(spm.name_or_path, add_bos_token=False)
    b = _backend(tiny_lm, off)
    assert b.front_ids == () and b.encode(TEXT)[0] != off.bos_token_id
    assert b.encode(TEXT) == off(TEXT)["input_ids"]


def test_one_bos_llama_style(tiny_lm, tmp_path):
    """Llama-2 (SentencePiece, ``<s> $A``) and Llama-3-like byte-level BPE: exactly one BOS, = tokenizer(text)."""
    for tok in (tf.llama2_spm_tokenizer(tmp_path / "spm"), tf.byte_level_bpe_tokenizer(tmp_path / "bpe"),
                helpers.make_tokenizer(tmp_path / "bos", vocab_size=300, bos=True)):
        b = _backend(tiny_lm, tok)
        ids = b.encode(TEXT)
        assert b.front_ids == (tok.bos_token_id,)
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert ids == list(tok(TEXT)["input_ids"])


def test_one_bos_when_chat_template_writes_it(tiny_lm, tmp_path):
    """A template that writes ``{{ bos_token }}``: the rendered text already starts with BOS -> one, not two."""
    tok = tf.byte_level_bpe_tokenizer(tmp_path / "bpe")  # LLAMA3_CHAT_TEMPLATE starts with {{ bos_token }}
    b = FlaxBackend.from_lm(tiny_lm, tok, role="serve", chat=True)
    text = b.render([{"role": "user", "content": TEXT}])
    assert text.startswith(tok.bos_token)
    ids = b.encode(text)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    spm = tf.llama2_spm_tokenizer(tmp_path / "spm")
    spm.chat_template = "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    ids = _backend(tiny_lm, spm).encode(spm.apply_chat_template([{"role": "user", "content": TEXT}], tokenize=False))
    assert ids[0] == spm.bos_token_id and ids.count(spm.bos_token_id) == 1


def test_trailing_specials_are_not_front(tmp_path):
    """A tokenizer that appends EOS (``$A </s>``) adds nothing in front; ``<s> $A </s>`` adds BOS only."""
    from tokenizers import processors

    for template, want in (("$A </s>", ()), ("<s> $A </s>", (1,))):
        tok = helpers.make_tokenizer(tmp_path / template.replace(" ", "_").replace("$", ""), vocab_size=300)
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[("<s>", 1), ("</s>", 2)])
        assert tok("Hello")["input_ids"][-1] == 2
        assert front_special_ids(tok) == want


def test_env_prompts_follow_the_same_rule(tiny_lm, tmp_path):
    """The env's token prompts (``env/pieces.py``) get the same front specials as ``FlaxBackend.encode``, so the
    in-graph reviewer and the text reviewer see the same ids, with and without a tokenizer BOS."""
    from teams_rl_jax.env.pieces import _with_bos, encode

    for tok in (helpers.make_tokenizer(tmp_path / "plain", vocab_size=300),
                helpers.make_tokenizer(tmp_path / "bos", vocab_size=300, bos=True),
                tf.llama2_spm_tokenizer(tmp_path / "spm")):
        want = _backend(tiny_lm, tok).encode(TEXT)
        assert _with_bos(tok, TEXT, encode(tok, TEXT), True) == want
        assert _with_bos(tok, tok.bos_token + TEXT, encode(tok, tok.bos_token + TEXT), True).count(tok.bos_token_id) == 1


def _checkpoint(path: Path, dtype_fields: dict) -> str:
    stored = dtype_fields.get("dtype") or dtype_fields.get("torch_dtype")
    lm = init({"model_type": "llama", "vocab_size": 320, "hidden_size": 16, "intermediate_size": 32,
               "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
               "max_position_embeddings": 128}, jax.random.key(0),
              dtype=stored if stored in ("bfloat16", "float32") else "float32")
    save_pretrained(lm, path)
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("dtype", None)
    cfg.pop("torch_dtype", None)
    cfg.update(dtype_fields)
    cfg_path.write_text(json.dumps(cfg))
    helpers.make_tokenizer(path, vocab_size=300)
    return str(path)


def _served_dtypes(argv):
    _, backend, _ = build_app(build_parser().parse_args(argv))
    return {x.dtype for x in jax.tree_util.tree_leaves(backend.lm.params)}


def test_dtype_auto_follows_checkpoint(tmp_path):
    """No ``--dtype``: bf16 checkpoint (transformers 5 ``dtype`` or 4.x ``torch_dtype``) is served in bf16;
    a float32 one and one naming no dtype in float32."""
    assert build_parser().parse_args(["--checkpoint", "x"]).dtype == "auto"
    cases = [({"dtype": "bfloat16"}, jnp.bfloat16), ({"torch_dtype": "bfloat16"}, jnp.bfloat16),
             ({"dtype": "float32"}, jnp.float32), ({}, jnp.float32)]
    for i, (fields, want) in enumerate(cases):
        ck = _checkpoint(tmp_path / f"c{i}", fields)
        assert _served_dtypes(["--checkpoint", ck]) == {jnp.dtype(want)}, fields


def test_explicit_dtype_wins(tmp_path):
    ck = _checkpoint(tmp_path / "bf16", {"dtype": "bfloat16"})
    assert resolve_dtype("float32", ck) == "float32"
    assert _served_dtypes(["--checkpoint", ck, "--dtype", "float32"]) == {jnp.dtype(jnp.float32)}
    bad = _checkpoint(tmp_path / "f64", {"dtype": "float64"})
    with pytest.raises(ConfigError, match="float64"):
        resolve_dtype("auto", bad)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_warmup_sampling_modes_parse_and_bad_ones_stop(capsys):
    """``--warmup-sampling`` defaults to every decode sampling mode the engine has; a subset is kept in
    order; an unknown mode stops argparse with exit 2 and one line naming the flag and the choices."""
    from teams_rl_jax.backends.continuous import SAMPLING_MODES

    parse = build_parser().parse_args
    assert parse(["--checkpoint", "m"]).warmup_sampling == SAMPLING_MODES == ("greedy", "sample", "filtered")
    got = parse(["--checkpoint", "m", "--warmup-sampling", "filtered, greedy"]).warmup_sampling
    assert got == ("filtered", "greedy")
    for bad in ("hot", "greedy,top_k", ","):
        with pytest.raises(SystemExit) as e:
            parse(["--checkpoint", "m", "--warmup-sampling", bad])
        assert e.value.code == 2
        assert "--warmup-sampling" in capsys.readouterr().err
