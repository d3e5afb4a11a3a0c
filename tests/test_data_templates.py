"""Prompt templates: exact Stanford Alpaca and FastChat Vicuna v1.1 wording; pieces agree with prompts."""

import pytest

from teams_rl_jax.data import format_alpaca, format_prompt, format_vicuna, get_template
from teams_rl_jax.errors import ConfigError

SYS = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
       "detailed, and polite answers to the user's questions.")


def test_alpaca_is_stanford_verbatim():
    # stanford_alpaca/train.py PROMPT_DICT, character for character
    assert format_alpaca("Do X.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nDo X.\n\n### Response:")
    assert format_alpaca("Do X.", "some ctx") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nDo X.\n\n### Input:\n"
        "some ctx\n\n### Response:")
    assert format_alpaca("Do X.", "") == format_alpaca("Do X.")  # Stanford: input block iff input != ""


def test_vicuna_v11_is_fastchat_verbatim():
    assert format_vicuna("Hi!") == f"{SYS} USER: Hi! ASSISTANT:"
    assert format_vicuna("Sum.", "2 3") == f"{SYS} USER: Sum.\n\n2 3 ASSISTANT:"
    two = f"{SYS} USER: a ASSISTANT: b</s>USER: c ASSISTANT:"
    assert format_vicuna("c", history=[("a", "b")]) == two
    assert format_vicuna([("user", "a"), ("assistant", "b"), ("user", "c")]) == two
    assert format_vicuna([{"role": "user", "content": "a"}, {"from": "gpt", "value": "b"}]) == \
        f"{SYS} USER: a ASSISTANT: b</s>"
    assert format_vicuna("a", system="Sys.", eos="<|end|>", history=[("q", "r")]) == \
        "Sys. USER: q ASSISTANT: r<|end|>USER: a ASSISTANT:"
    with pytest.raises(ValueError, match="message 1: expected role assistant, got user"):
        format_vicuna([("user", "a"), ("user", "b")])


@pytest.mark.parametrize("name", ["alpaca", "vicuna"])
@pytest.mark.parametrize("inp", ["", "the input"])
def test_pieces_are_prompt_then_response(name, inp):
    t = get_template(name)
    history = (("u1", "a1"), ("u2", "a2")) if t.multi_turn else ()
    pieces = t.pieces("Instr.", inp, "The answer.", history, None, "</s>")
    assert pieces[-1][1] and not pieces[-2][1]
    # the training text up to the last response is exactly the inference prompt
    assert "".join(p for p, _ in pieces[:-1]) == format_prompt(name, "Instr.", inp, history)
    assert pieces[-1][0].strip() == "The answer."
    responses = [p for p, r in pieces if r]
    assert len(responses) == len(history) + 1
    if history:
        assert responses[:-1] == [" a1</s>", " a2</s>"]


def test_registry_and_errors():
    assert format_prompt("alpaca", "x", "y") == format_alpaca("x", "y")
    assert format_prompt("vicuna", "x", "y", [("a", "b")], system="S") == format_vicuna("x", "y", [("a", "b")],
                                                                                     system="S")
    with pytest.raises(ConfigError, match="unknown prompt template 'chatml' \\(valid: alpaca, vicuna, chat\\)"):
        get_template("chatml")
    with pytest.raises(ConfigError, match="template 'chat' renders with the tokenizer's chat template"):
        format_prompt("chat", "x")
    with pytest.raises(ConfigError, match="'alpaca' has no chat turns"):
        format_prompt("alpaca", "x", history=[("a", "b")])
