"""The reviewer on text: the comparison prompt, the reply parsers, and the unparseable count.

TeaMs-RL's reviewer answers whether the evolved instruction equals the old one ("Equal": no
information gain, WizardLM's first elimination rule) or not ("Not Equal": reward 1). One prompt
(:data:`JUDGE_INSTRUCTION`, or the ``judge`` template of a ``prompts:`` file; :func:`judge_messages`) serves the text path here and the jitted logit
judge (``env.judge``, which reads ``P(Not Equal)`` from the same prompt's next-token logits).

Two parsers, chosen per run by ``roles.reviewer.parser``:

* ``exact``: the reference code's rule: the stripped reply is ``"Not Equal"`` -> Not Equal;
  anything else -> Equal (no reply is unparseable).
* ``lenient`` (default): for chat models that answer in sentences; reads what the reply means,
  not only its keywords ("They are not the same." and "Equal? No, they differ." are Not Equal).
  A reply it cannot read is ``None`` (unparseable): scored as Equal (no gain) and counted.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

from teams_rl_jax.errors import BackendError, ConfigError

# Our wording of the paper's comparison prompt (WizardLM's equality check); each instruction on its own
# line. Rendered with the reviewer's chat template when it has one, else Vicuna v1.1 (data.chat).
JUDGE_INSTRUCTION = (
    "Here are two instructions written for an AI assistant. Decide whether they are equal, meaning that "
    "they have the same constraints and requirements, and the same depth and breadth of inquiry.\n"
    "First instruction:\n{old}\n"
    "Second instruction:\n{new}\n"
    "Answer with exactly one of: Equal, Not Equal. Do not explain."
)
NOT_EQUAL, EQUAL = 1.0, 0.0
PARSERS = ("exact", "lenient")


JUDGE_SLOTS = ("old", "new")  # the judge template's placeholders: {old} and {new}


def judge_messages(old: str, new: str, *, instruction: str = JUDGE_INSTRUCTION) -> list[dict[str, str]]:
    """Chat messages asking the reviewer whether ``new`` gains over ``old`` (``instruction``: the judge
    template; only ``{old}`` and ``{new}`` are filled, other braces are kept as written)."""
    values = {"old": old.strip(), "new": new.strip()}
    content = re.sub(r"\{(old|new)\}", lambda m: values[m.group(1)], instruction)
    return [{"role": "user", "content": content}]


def parse_exact(text: str) -> float:
    """The reference rule: 1.0 when the stripped reply is exactly "Not Equal", else 0.0."""
    return NOT_EQUAL if text.strip() == "Not Equal" else EQUAL


_SAME = r"(?:equal|the\s+same|same|identical|equivalent)"
# "not different", "no different", "don't differ": equal in negated form (checked first).
_EQUAL_NEGATED = re.compile(r"(?:\bnot|\bno|n't|\bnever)\s+(?:really\s+)?(?:different|differ)\b", re.I)
_NOT_EQUAL_PATTERNS = [
    re.compile(r"^\W*not\s+equal\b", re.I),  # the expected answer, any case, any punctuation
    re.compile(rf"(?:\bnot|n't|\bnever)\s+(?:quite\s+|really\s+|exactly\s+)?{_SAME}\b", re.I),
    re.compile(r"\b(?:unequal|different|differs?|differing|difference|distinct|inequivalent)\b", re.I),
    re.compile(r"^\W*(?:equal|same)\s*\?\s*no\b", re.I),  # "Equal? No, ..."
]
_EQUAL_PATTERN = re.compile(rf"\b{_SAME}\b", re.I)


def parse_lenient(text: str) -> float | None:
    """1.0 (Not Equal), 0.0 (Equal), or None when the reply says neither (see the module docstring)."""
    if _EQUAL_NEGATED.search(text):
        return EQUAL
    if any(p.search(text) for p in _NOT_EQUAL_PATTERNS):
        return NOT_EQUAL
    if _EQUAL_PATTERN.search(text):
        return EQUAL
    return None


def parse_reply(text: str, parser: str = "lenient") -> float | None:
    """The reviewer's verdict from its reply with ``parser`` (``exact`` or ``lenient``)."""
    if parser == "exact":
        return parse_exact(text)
    if parser == "lenient":
        return parse_lenient(text)
    raise ConfigError(f"roles.reviewer.parser: expected one of {list(PARSERS)}, got {parser!r}")


@dataclasses.dataclass(eq=False)
class Reviewer:
    """The reviewer role behind any backend: ``judge(olds, news)`` -> verdicts (greedy, one query per row).

    ``stats``: ``calls``, ``rows`` and ``unparseable`` (replies the parser could not read; scored Equal).
    """

    backend: Any
    max_new_tokens: int = 8
    parser: str = "lenient"
    template: str = JUDGE_INSTRUCTION  # the judge template ({old}, {new}); a ``prompts:`` file sets it
    stats: dict = dataclasses.field(default_factory=lambda: {"calls": 0, "rows": 0, "unparseable": 0})

    def __post_init__(self):
        if self.parser not in PARSERS:
            raise ConfigError(f"roles.reviewer.parser: expected one of {list(PARSERS)}, got {self.parser!r}")

    def judge(self, olds: Sequence[str], news: Sequence[str], seed: int | None = None,
              replies: list[str] | None = None) -> list[float | None]:
        """``parse_reply`` of the reviewer's answer for each ``(old, new)`` pair (``replies``: a list the
        raw reply texts are appended to, in the same order; the generate stage's trace)."""
        if not olds:
            return []
        outs = self.backend.complete([judge_messages(o, n, instruction=self.template) for o, n in zip(olds, news)],
                                     max_new_tokens=self.max_new_tokens, temperature=0.0, top_p=1.0, seed=seed)
        if len(outs) != len(olds):
            raise BackendError(f"reviewer returned {len(outs)} completions for {len(olds)} prompts")
        verdicts = [parse_reply(c.text, self.parser) for c in outs]
        if replies is not None:
            replies.extend(c.text for c in outs)
        self.stats["calls"] += 1
        self.stats["rows"] += len(olds)
        self.stats["unparseable"] += sum(v is None for v in verdicts)
        return verdicts
