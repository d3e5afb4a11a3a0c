"""The reviewer judge with real-shaped tokenizers (Llama-2 SentencePiece, Llama-3-like byte-level BPE)."""

import pytest

from tokenizer_fixtures import byte_level_bpe_tokenizer, eos_ids_of, llama2_spm_tokenizer


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
    return llama2_spm_tokenizer(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory):
    return byte_level_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


def test_spm_fixture_has_the_llama2_leading_space_premise(spm_tok):
    """Issue 7 defect 2's premise: with the Llama-2 tokenizer.json normalizer, " Equal" tokenized alone
    starts with a lone whitespace piece, while after "ASSISTANT:" in context it is one "▁Equal" piece."""
    assert (spm_tok.bos_token_id, spm_tok.eos_token_id, spm_tok.unk_token_id) == (1, 2, 0)
    alone = spm_tok.convert_ids_to_tokens(spm_tok(" Equal", add_special_tokens=False)["input_ids"])
    assert alone[0] == "▁", alone
    in_context = spm_tok.convert_ids_to_tokens(spm_tok("ASSISTANT: Equal", add_special_tokens=False)["input_ids"])
    assert in_context[-1] == "▁Equal", in_context
    assert spm_tok("x")["input_ids"][0] == 1  # <s> prepended like Llama-2


def test_byte_level_fixture_has_two_eos_and_a_distinct_pad(bpe_tok):
    eos = eos_ids_of(bpe_tok)
    assert len(eos) == 2 and bpe_tok.pad_token_id not in eos
    assert bpe_tok.convert_ids_to_tokens([0])[0] == "!"  # id 0 is a real token, as in Llama-3
    assert bpe_tok.chat_template
