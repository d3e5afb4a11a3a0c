"""Chat-format SFT (``sft.data.template: chat``, issue 20 part 3): ids equal ``apply_chat_template``'s, loss on
assistant turns only, packing keeps the masks, reader and config errors are one line.

Tokenizers are built here: a small byte-level BPE (``tokenizers``) wrapped in ``PreTrainedTokenizerFast``
with the chat markers as special tokens; the Jinja templates below are modelled on the real Llama-2-chat,
Llama-3-instruct and ChatML (Qwen) templates. No model hub.
"""

import importlib
import json

import numpy as np
import pytest

from teams_rl_jax.config import from_dict
from teams_rl_jax.data import DataConfig, Example, make_batch_iterator, read_dataset
from teams_rl_jax.data.chat_sft import CHATML, example_messages
from teams_rl_jax.data.packing import first_fit, pack_rows
from teams_rl_jax.errors import ConfigError, DataError

# Reached as module attributes so mutations of the module are seen by these tests.
TK = importlib.import_module("teams_rl_jax.data.tokenize")

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHATML_QWEN = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama-3 style with transformers' {% generation %} markers around each assistant reply and its end.
LLAMA3_GEN = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MARKERS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

SYSTEM = "You answer in short sentences."
MULTI = [{"role": "system", "content": SYSTEM},
         {"role": "user", "content": "What is the sea made of?"},
         {"role": "assistant", "content": "Salt water, mostly."},
         {"role": "user", "content": "And the sun?"},
         {"role": "assistant", "content": "Hot gas: hydrogen and helium."}]
TEXTS = [m["content"] for m in MULTI] + ["Name a color.", "Blue.", "Write a poem about rain.", "Rain falls softly.",
                                         "INST SYS assistant user system helpful"]


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"] + MARKERS,
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(TEXTS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", additional_special_tokens=MARKERS)


def with_template(tok, jinja):
    tok.chat_template = jinja
    return tok


def hf_ids(tok, messages, **kw):
    out = tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def encode(tok, ex, max_seq_len=512, chat_template=None):
    (seq,), stats = TK.tokenize_dataset([ex], tok, "chat", max_seq_len, chat_template=chat_template)
    return seq[0].tolist(), seq[1].tolist()


def ex_from(messages):
    sys = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = messages[1:] if sys is not None else messages
    pairs = [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns), 2)]
    return Example(pairs[-1][0], pairs[-1][1], "", tuple(pairs[:-1]), None, sys)


@pytest.mark.parametrize("jinja", [LLAMA2, LLAMA3, CHATML_QWEN], ids=["llama2", "llama3", "chatml"])
@pytest.mark.parametrize("case", ["alpaca", "alpaca_input", "multi"])
def test_ids_equal_apply_chat_template(tok, jinja, case):
    """Catches (tried): the tokenizer's EOS appended on top of the template's (chat path through _finish with
    eos), the input joined with " " instead of a blank line."""
    with_template(tok, jinja)
    ex = {"alpaca": Example("Name a color.", "Blue."),
          "alpaca_input": Example("Write a poem about rain.", "Rain falls softly.", "Name a color."),
          "multi": ex_from(MULTI)}[case]
    msgs = {"alpaca": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}],
            "alpaca_input": [{"role": "user", "content": "Write a poem about rain.\n\nName a color."},
                             {"role": "assistant", "content": "Rain falls softly."}],
            "multi": MULTI}[case]
    assert example_messages(ex) == msgs
    ids, mask = encode(tok, ex)
    assert ids == hf_ids(tok, msgs)
    assert len(mask) == len(ids) and 0 < sum(mask) < len(ids)


def test_mask_equals_transformers_assistant_mask(tok):
    """The prefix-rendering mask equals transformers' ``return_assistant_tokens_mask`` on a template with
    ``{% generation %}`` markers. Catches (tried): mask shifted right by one (slice start + 1), the span ending
    one early (misses <|eot_id|>), system/user turns masked in (role != 'assistant' test inverted)."""
    with_template(tok, LLAMA3_GEN)
    for msgs in (MULTI, MULTI[1:3]):
        ids, mask = encode(tok, ex_from(msgs))
        ref = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert ids == list(ref["input_ids"])
        assert mask == list(ref["assistant_masks"])


@pytest.mark.parametrize("jinja", [LLAMA2, LLAMA3, CHATML_QWEN], ids=["llama2", "llama3", "chatml"])
def test_multi_turn_masks_both_assistant_turns_only(tok, jinja):
    """Masked tokens are exactly the two replies (with the template's end of turn), in order; nothing of the
    system or user turns.

    Tried: only the first assistant turn masked (break after one) -> fails; system turn masked in -> fails."""
    with_template(tok, jinja)
    ids, mask = encode(tok, ex_from(MULTI))
    end = {LLAMA2: " </s>", LLAMA3: "<|eot_id|>", CHATML_QWEN: "<|im_end|>\n"}[jinja]
    lead = " " if jinja is LLAMA2 else ""
    want = [tok(lead + MULTI[k]["content"] + end, add_special_tokens=False)["input_ids"] for k in (2, 4)]
    spans = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    assert len(spans) == 4  # two runs of ones
    assert [ids[a:b] for a, b in zip(spans[::2], spans[1::2])] == want
    assert sum(mask) == sum(map(len, want))


def test_packing_keeps_the_masks(tok, tmp_path):
    """A packed batch's loss mask is, at each example's place, that example's mask (and 0 on padding).
    Catches (tried): packing writing the loss mask from the ids (ids > 0). Also end to end through
    DataConfig(template=chat) and make_batch_iterator."""
    with_template(tok, LLAMA3)
    exs = [ex_from(MULTI), Example("Name a color.", "Blue."), Example("Write a poem about rain.", "Rain falls softly.",
                                                                       "Name a color."), ex_from(MULTI[1:3])]
    seqs, _ = TK.tokenize_dataset(exs, tok, "chat", 128)
    T = 128
    rows = pack_rows(seqs, T, window=8)
    row, off, n_rows = first_fit([len(i) for i, _ in seqs], T, 8)
    assert n_rows < len(seqs)  # several examples share a row
    want = np.zeros((n_rows, T), np.int32)
    for (ids, m), r, o in zip(seqs, row, off):
        want[r, o:o + len(m)] = m
        assert rows["input_ids"][r, o:o + len(ids)].tolist() == ids.tolist()
    np.testing.assert_array_equal(rows["loss_mask"], want)

    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": MULTI}) + "\n" for _ in range(3)))
    ids, m = encode(tok, ex_from(MULTI))
    cfg = DataConfig(path=str(path), template="chat", max_seq_len=3 * len(ids), pack=True, shuffle=False)
    it, stats = make_batch_iterator(cfg, tok, global_batch=1)
    batch = next(it)
    assert batch["segment_ids"][0].max() == 3  # all three in one row
    assert batch["loss_mask"][0, batch["segment_ids"][0] > 0].tolist() == m * 3
    assert stats.loss_tokens == 3 * sum(m)


def test_readers_map_messages_and_sharegpt(tmp_path):
    """OpenAI ``messages`` and ShareGPT ``conversations`` records give the same example."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({"messages": MULTI}) + "\n")
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    b.write_text(json.dumps({"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in MULTI]})
                 + "\n")
    assert read_dataset(a) == read_dataset(b) == [ex_from(MULTI)]
    assert example_messages(read_dataset(a)[0]) == MULTI


@pytest.mark.parametrize("turns", [["user", "user", "assistant"], ["assistant", "user"],
                                   ["user", "assistant", "system", "user", "assistant"]])
def test_non_alternating_record_is_one_line_error(tmp_path, turns):
    """Catches (tried): the reader accepting two user turns in a row; the error not naming file:line (the
    ``where`` prefix dropped)."""
    path = tmp_path / "bad.jsonl"
    good = {"messages": MULTI[1:3]}
    bad = {"messages": [{"role": r, "content": "x"} for r in turns]}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as e:
        read_dataset(path)
    assert str(e.value).startswith(f"{path}:3: ") and "\n" not in str(e.value)


def test_missing_chat_template_is_one_line_config_error(tok, tmp_path):
    """Catches (tried): silently falling back to the builtin chatml when neither is set."""
    with_template(tok, None)
    with pytest.raises(ConfigError) as e:
        TK.tokenize_dataset([Example("Name a color.", "Blue.")], tok, "chat", 64)
    assert "sft.data.chat_template" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="sft.data.chat_template: 'nope.jinja' is neither"):
        TK.tokenize_dataset([Example("Name a color.", "Blue.")], tok, "chat", 64, chat_template="nope.jinja")
    with pytest.raises(ConfigError, match="chat_template is only used with template 'chat'"):
        from_dict(DataConfig, {"template": "alpaca", "chat_template": "chatml"})


def test_configured_template_builtin_and_file(tok, tmp_path):
    """Without a template of its own the tokenizer renders with sft.data.chat_template (builtin or file);
    its own template wins when it has one."""
    ex = ex_from(MULTI)
    with_template(tok, CHATML)
    want = hf_ids(tok, MULTI)
    with_template(tok, None)
    assert encode(tok, ex, chat_template="chatml")[0] == want
    f = tmp_path / "t.jinja"
    f.write_text(LLAMA3)
    got = encode(tok, ex, chat_template=str(f))[0]
    with_template(tok, LLAMA3)
    assert got == hf_ids(tok, MULTI)
    assert encode(tok, ex, chat_template="chatml")[0] == hf_ids(tok, MULTI)  # own template wins
    assert from_dict(DataConfig, {"template": "chat", "chat_template": "chatml"}).chat_template == "chatml"


def test_prefix_unstable_template_is_one_line_error(tok):
    """A template whose earlier turns render differently once later turns exist (here: a turn count up front)
    cannot place the loss: a one-line DataError naming the record. Catches (tried): skipping the prefix check."""
    with_template(tok, "{{ messages | length }}" + LLAMA3)
    with pytest.raises(DataError) as e:
        TK.tokenize_dataset([Example("Name a color.", "Blue."), ex_from(MULTI)], tok, "chat", 128)
    assert str(e.value).startswith("example 0: ") and "not a token prefix" in str(e.value)
    assert "\n" not in str(e.value)


def test_offline_word_tokenizer_with_configured_template(tmp_path):
    """The SFT stage's offline default (a word-level tokenizer built from the message texts) renders with a
    configured template, and once it is the tokenizer's own (as the SFT stage sets it before saving) the saved
    and reloaded tokenizer gives the same ids."""
    from teams_rl_jax.data.tokenizer import build_word_tokenizer, load_tokenizer

    ex = ex_from(MULTI)
    word = build_word_tokenizer([" ".join(m["content"] for m in example_messages(ex))], 256)
    ids, mask = encode(word, ex, chat_template="chatml")
    assert 0 < sum(mask) < len(ids)
    word.chat_template = CHATML
    word.save_pretrained(str(tmp_path))
    again = load_tokenizer(tmp_path)
    assert encode(again, ex)[0] == ids == hf_ids(again, MULTI)


def test_sft_stage_trains_chat_and_exports_the_template(tmp_path):
    """sft.data.template: chat end to end on the offline default (random tiny model, word-level tokenizer from
    the data, sft.data.chat_template: chatml): trains, and the exported tokenizer carries the template the data
    was rendered with (tried: not setting it on the tokenizer -> the export has none -> fails)."""
    from transformers import AutoTokenizer

    from teams_rl_jax.sft.config import SFTConfig
    from teams_rl_jax.sft.loop import train

    tiny = dict(model_type="llama", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (MULTI, MULTI[1:3], MULTI[:3], MULTI[1:])))
    cfg = from_dict(SFTConfig, {"model": {"config": tiny}, "max_steps": 1, "global_batch": 2,
                                "data": {"path": str(data), "template": "chat", "chat_template": "chatml",
                                         "max_seq_len": 128}})
    train(cfg, tmp_path / "run", log=lambda m: None)
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "sft" / "hf")
    assert tok.chat_template == CHATML
    # The eval stage's MIA renders records with the SFT template (mia.template auto -> chat): the export's
    # own chat template, the same loss as SFT.
    from teams_rl_jax.eval.mia import run_mia

    non = tmp_path / "non.jsonl"
    non.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"unseen question {k}?"},
                                                    {"role": "assistant", "content": f"unseen answer {k}."}]}) + "\n"
                           for k in range(3)))
    rep = run_mia(tmp_path / "run" / "sft" / "hf", str(data), str(non), template="chat", max_seq_len=128,
                  log=lambda m: None)
    assert 0.0 <= rep["loss"]["auc"] <= 1.0
