"""Test helpers shared by several test modules (no model hub: tokenizers are built here, offline)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

# Seeds drawn by the running test (cleared before each test by conftest.py, printed by its report hook
# when the test fails, so a failure can be replayed).
SEEDS_USED: list[tuple[str, int]] = []


def free_port() -> int:
    """A free TCP port on loopback (for a test's server subprocess)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc, log_path: Path, timeout_s: float, headers: dict | None = None) -> None:
    """Poll ``url`` until it answers 200; fail with the server log's tail if ``proc`` exits or time runs out."""
    import time

    import httpx

    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(url, headers=headers, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, f"server exited: {Path(log_path).read_text()[-3000:]}"
        assert time.time() < deadline, f"server did not come up: {Path(log_path).read_text()[-3000:]}"
        time.sleep(0.3)


def rng(seed: int, label: str = "") -> np.random.Generator:
    """``np.random.default_rng(seed)``, recording the seed so a failing test's report prints it.

    Every test's randomness goes through here (or a fixed ``jax.random.key``): no unseeded generators.
    """
    SEEDS_USED.append((label or "rng", int(seed)))
    return np.random.default_rng(seed)


def seed(value: int, label: str = "seed") -> int:
    """Record (and return) an integer seed used for something other than a numpy Generator
    (``torch.manual_seed``, ``jax.random.key``), so the failure report prints it too."""
    SEEDS_USED.append((label, int(value)))
    return int(value)

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3: pad, bos, eos, unk (as models/TINY_MODEL expect)

_DEFAULT_TEXTS = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.",
    "### Instruction:\nName three primary colors.\n\n### Input:\npaint\n\n### Response:\nRed, yellow and blue.",
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: Hello! ASSISTANT: Hi, how can I help?</s>",
    "Explain why the sky looks blue during the day. Sunlight is scattered by the molecules of the air.",
    "Write a short poem about the sea, the sun and the moon. List three items; answer yes or no, please.",
    "Convert 25 degrees Celsius to Fahrenheit: 25 x 9/5 + 32 = 77 degrees Fahrenheit.",
    "Summarize the following text in one sentence, then rewrite it with more constraints and deeper reasoning.",
)


def make_tokenizer(tmp_dir: str | Path, texts: Iterable[str] | None = None, vocab_size: int = 400,
                   bos: bool = False):
    """A small byte-level BPE tokenizer trained on ``texts`` (a built-in English sample by default), wrapped
    in ``PreTrainedTokenizerFast`` with pad/bos/eos/unk = ids 0/1/2/3, saved to ``tmp_dir`` and loaded
    back with ``AutoTokenizer.from_pretrained`` (so tests exercise the same loading path as real models).

    Byte-level: any text encodes (no unknown tokens) and merges can cross word/punctuation boundaries,
    unlike the runtime word-level fallback in ``teams_rl_jax.data.tokenizer``.

    ``bos=True`` adds a ``<s> $A`` post-processor, so ``tokenizer(text)`` prepends BOS as Llama's does
    (the default adds no specials, like Qwen2's).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts) if texts is not None else list(_DEFAULT_TEXTS), trainer)
    if bos:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(str(tmp_dir))
    return AutoTokenizer.from_pretrained(str(tmp_dir))
