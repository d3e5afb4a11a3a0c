"""Chat-format SFT (``sft.data.template: chat``): records rendered with a chat template, loss on assistant tokens.

* Which template: the tokenizer's own ``chat_template`` when the base checkpoint ships one; otherwise
  ``sft.data.chat_template``, a builtin name (:data:`BUILTIN_CHAT_TEMPLATES`: ``chatml``) or the path of
  a Jinja file. Neither is a one-line ConfigError naming ``sft.data.chat_template`` (base Llama-2 has no
  template, so it needs the key).
* Messages (:func:`example_messages`): an optional system message, the earlier ``(user, assistant)``
  exchanges, then the user turn and the reply. A single-turn Alpaca record is one exchange whose user
  content is the instruction, plus ``"\\n\\n" + input`` when the input is non-empty.
* Ids (:func:`encode_chat`) are exactly ``apply_chat_template(messages, tokenize=True)`` of the whole
  conversation: the template writes BOS/EOS/turn ends itself, nothing is added.
* Loss mask by rendering prefixes: the span of assistant turn ``k`` is the tokens of
  ``render(m[:k+1])`` past those of ``render(m[:k], add_generation_prompt=True)``; both must be token
  prefixes of the full rendering (else a one-line DataError naming the record). The span is everything
  the template writes after the generation prompt up to the end of the turn: the reply and its end
  marker (``</s>``, ``<|eot_id|>``, ``<|im_end|>`` and, in ChatML, the newline after it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from teams_rl_jax.data.example import Example
from teams_rl_jax.errors import ConfigError, DataError

# ChatML (as in Qwen / OpenAI's ChatML), without a default system prompt.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILTIN_CHAT_TEMPLATES = {"chatml": CHATML}
KEY = "sft.data.chat_template"


def example_messages(ex: Example) -> list[dict[str, str]]:
    """``[{"role", "content"}, ...]`` of an example: system?, history, user (instruction [+ "\\n\\n" + input]), reply."""
    msgs = [{"role": "system", "content": ex.system}] if ex.system is not None else []
    for user, assistant in ex.history:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    user = f"{ex.instruction}\n\n{ex.input}" if ex.input else ex.instruction
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": ex.output}]


def resolve_chat_template(tokenizer, configured: str | None = None) -> str:
    """The Jinja text to render with: the tokenizer's own, else ``configured`` (builtin name or file path)."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own:
        return own
    if not configured:
        raise ConfigError(f"template 'chat': the tokenizer has no chat template and {KEY} is not set "
                          f"(a Jinja file or one of {', '.join(BUILTIN_CHAT_TEMPLATES)})")
    if configured in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[configured]
    path = Path(configured)
    if not path.is_file():
        raise ConfigError(f"{KEY}: {configured!r} is neither a builtin ({', '.join(BUILTIN_CHAT_TEMPLATES)}) "
                          f"nor a file")
    return path.read_text(encoding="utf-8")


def _ids(tokenizer, messages: Sequence[dict[str, Any]], template: str, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=True,
                                        add_generation_prompt=add_generation_prompt)
    if hasattr(out, "keys"):  # transformers versions that return a BatchEncoding by default
        out = out["input_ids"]
    return [int(i) for i in out]


def encode_chat(tokenizer, messages: Sequence[dict[str, Any]], template: str,
                where: str = "record") -> tuple[list[int], list[int]]:
    """``(ids, loss_mask)``: ids of the whole conversation, mask 1 on every assistant turn's span."""
    try:
        full = _ids(tokenizer, messages, template, False)
        mask = [0] * len(full)
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = _ids(tokenizer, messages[:k], template, True)
            upto = _ids(tokenizer, messages[:k + 1], template, False)
            if full[:len(before)] != before or full[:len(upto)] != upto or len(upto) < len(before):
                raise DataError(f"{where}: the chat template's rendering of turns 0..{k} is not a token prefix of "
                                f"the whole conversation; cannot place the loss on assistant turn {k}")
            mask[len(before):len(upto)] = [1] * (len(upto) - len(before))
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - Jinja raises many types (e.g. raise_exception in the template)
        msg = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"{where}: cannot apply the chat template ({type(e).__name__}: {msg})") from None
    return full, mask
