"""Tokenization: response-only loss + EOS, prompt ids as at inference, multi-turn masks, truncation policy."""

import importlib

import numpy as np
import pytest
from helpers import make_tokenizer

from teams_rl_jax.data import Example, format_prompt, prompt_text
from teams_rl_jax.data.tokenizer import build_word_tokenizer, load_tokenizer
from teams_rl_jax.errors import CheckpointError, ConfigError

# Reached as module attributes (as the pipeline calls them) so ../shared/tools/mutate.py probes these tests.
TK = importlib.import_module("teams_rl_jax.data.tokenize")
tokenize_example = lambda *a, **k: TK.tokenize_example(*a, **k)  # noqa: E731
tokenize_dataset = lambda *a, **k: TK.tokenize_dataset(*a, **k)  # noqa: E731


@pytest.fixture(scope="module", params=["byte_bpe", "llama2_spm"])
def tok(request, tmp_path_factory):
    """Byte-level BPE (Llama-3/Qwen2 style), and a Llama-1/2-style SentencePiece tokenizer trained here with
    the ``sentencepiece`` trainer (tests/tokenizer_fixtures.py): its leading-space normalizer ("▁" before
    the first word) is what makes prompt/response boundaries differ from byte-level BPE. No ../shared."""
    if request.param == "byte_bpe":
        return make_tokenizer(tmp_path_factory.mktemp("tok"))
    from tokenizer_fixtures import llama2_spm_tokenizer

    return llama2_spm_tokenizer(tmp_path_factory.mktemp("spm"))


def _spans(mask):
    """[start, end) runs of ones."""
    d = np.diff(np.concatenate([[0], mask, [0]]))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


@pytest.mark.parametrize("template", ["alpaca", "vicuna"])
@pytest.mark.parametrize("inp", ["", "sea and sun"])
def test_loss_only_on_response_and_eos(tok, template, inp):
    """Catches: loss mask on prompt tokens (checked: every token masked 1 fails), missing EOS/BOS, prompt ids
    that differ from what the prompt alone gives at inference (Llama-2 SentencePiece and byte-level BPE)."""
    ex = Example("Write a short poem about the moon.", "The moon is here, yes.", inp)
    ids, mask, status = tokenize_example(ex, tok, template, 512)
    assert status == "kept" and ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape
    assert ids[0] == tok.bos_token_id and mask[0] == 0
    assert ids[-1] == tok.eos_token_id and mask[-1] == 1
    (start, end), = _spans(mask)  # one response span, running to the end
    assert end == len(ids)
    # the prompt's ids are exactly what the prompt alone gives at inference
    prompt_ids = [tok.bos_token_id] + tok(prompt_text(ex, template), add_special_tokens=False)["input_ids"]
    assert ids[:start].tolist() == prompt_ids
    assert tok.decode(ids[start:-1]).strip() == ex.output


def test_vicuna_multi_turn_loss_on_every_reply(tok):
    """Catches: loss only on the last reply, history replies without the real EOS, system prompt dropped."""
    ex = Example("and the sun?", "It is hot.", history=(("Is the moon far?", "Yes, very far."),
                                                      ("Why blue?", "Sunlight is scattered.")), system="Be brief.")
    ids, mask, _ = tokenize_example(ex, tok, "vicuna", 512)
    spans = _spans(mask)
    # (strip: SentencePiece's decoder drops the leading "▁" of a span that starts a decode)
    got = [tok.decode(ids[s:e]).strip() for s, e in spans]
    assert got == ["Yes, very far.</s>", "Sunlight is scattered.</s>", "It is hot.</s>"]
    # history EOS markers are the real EOS token, and the prompt is Vicuna's with the custom system prompt
    assert [ids[e - 1] for s, e in spans] == [tok.eos_token_id] * 3
    assert tok.decode(ids[1:spans[0][0]]) == "Be brief. USER: Is the moon far? ASSISTANT:"
    prompt = [tok.bos_token_id] + tok(format_prompt("vicuna", ex.instruction, "", ex.history, system="Be brief."),
                                      add_special_tokens=False)["input_ids"]
    assert ids[:spans[-1][0]].tolist() == prompt


def test_token_straddling_prompt_and_response_falls_back(tmp_path):
    # "::" is a learned merge; the Alpaca prompt ends in ':' and the answer starts with ':' -> one token
    # would straddle the boundary; the pieces are then tokenized separately so the answer keeps its ':'.
    tok = make_tokenizer(tmp_path, ["a :: b :: c ::) d ::" * 20, "### Response: Instruction task"], 300)
    colons, = tok("::", add_special_tokens=False)["input_ids"]
    ex = Example("x", ":) ok")
    assert colons in tok(prompt_text(ex, "alpaca") + ex.output, add_special_tokens=False)["input_ids"]
    ids, mask, _ = tokenize_example(ex, tok, "alpaca", 512)
    (start, end), = _spans(mask)
    assert ids[start:-1].tolist() == tok(":) ok", add_special_tokens=False)["input_ids"]
    assert ids[1:start].tolist() == tok(prompt_text(ex, "alpaca"), add_special_tokens=False)["input_ids"]


def test_truncation_policy_counts_and_cuts(tok):
    """Catches: the head cut instead of the tail, a cut answer keeping its EOS, wrong counts in the stats."""
    ex_ok = Example("List three items.", "Sea, sun, moon.")
    n_ok = len(tokenize_example(ex_ok, tok, "alpaca", 10_000)[0])
    long_answer = Example("List three items.", "the sea and the sun " * 30)
    n_long = len(tokenize_example(long_answer, tok, "alpaca", 10_000)[0])
    long_prompt = Example("explain why " * 80, "yes")
    T = n_ok + 10
    seqs, stats = tokenize_dataset([long_answer, ex_ok, long_prompt], tok, "alpaca", T)
    assert (stats.examples, stats.kept, stats.truncated, stats.dropped) == (3, 2, 1, 1)
    assert stats.truncated_indices == [0] and stats.dropped_indices == [2]
    n_lp = len(tokenize_example(long_prompt, tok, "alpaca", 10_000)[0])
    assert stats.cut_tokens == n_long - T and stats.longest == max(n_long, n_lp)
    cut_ids, cut_mask = seqs[0]
    assert len(cut_ids) == T and cut_ids[-1] != tok.eos_token_id  # a cut answer does not teach stopping
    full_ids, full_mask, _ = tokenize_example(long_answer, tok, "alpaca", 10_000)
    assert (cut_ids == full_ids[:T]).all() and (cut_mask == full_mask[:T]).all()  # the tail is what goes
    assert stats.tokens == T + n_ok and stats.loss_tokens == int(cut_mask.sum() + seqs[1][1].sum())
    assert "1 truncated" in stats.summary() and "1 dropped" in stats.summary()


def test_min_response_tokens_boundary(tok):
    ex = Example("Explain why the sky looks blue.", "Sunlight is scattered by the air.")
    ids, mask, _ = tokenize_example(ex, tok, "alpaca", 10_000)
    p = int(np.argmax(mask))  # prompt length incl. BOS
    for k, expect in [(1, "truncated"), (3, "truncated"), (4, "dropped")]:
        assert tokenize_example(ex, tok, "alpaca", p + 3, min_response_tokens=k)[2] == expect
    assert tokenize_example(ex, tok, "alpaca", p, min_response_tokens=1)[2] == "dropped"
    assert tokenize_example(ex, tok, "alpaca", len(ids))[2] == "kept"


def test_errors(tok):
    with pytest.raises(ConfigError, match="1 examples are multi-turn conversations but template 'alpaca'"):
        tokenize_dataset([Example("a", "b", history=(("c", "d"),)), Example("e", "f")], tok, "alpaca", 64)
    with pytest.raises(ConfigError, match="unknown prompt template"):
        tokenize_dataset([Example("a", "b")], tok, "chatml", 64)


def test_word_tokenizer_saves_and_loads(tmp_path):
    texts = ["write a poem about the sea", format_prompt("alpaca", "x", "y"), format_prompt("vicuna", "x")]
    built = build_word_tokenizer(texts, 200, save_dir=tmp_path / "wt")
    loaded = load_tokenizer(tmp_path / "wt")
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2, 3)
    ex = Example("write a poem", "the sea")
    a, b = tokenize_example(ex, built, "vicuna", 128), tokenize_example(ex, loaded, "vicuna", 128)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all() and a[2] == "kept"
    assert loaded.unk_token_id not in a[0][a[1] == 1][:-1]  # answer words are in the vocabulary
    with pytest.raises(CheckpointError, match=r"tokenizer dir does not exist: .*nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "junk").mkdir()
    with pytest.raises(CheckpointError, match=r"junk: cannot load tokenizer"):
        load_tokenizer(tmp_path / "junk")
