"""The reviewer judge: does the evolved instruction add constraints or depth over the old one?

TeaMs-RL's reviewer answers a comparison prompt with "Equal" or "Not Equal"; "Not Equal" means the
evolution gained something (reward 1), "Equal" means no information gain (WizardLM's first elimination
rule). We keep the decision but make it dense and parse-free for a local reviewer LM: the reward is

    P(Not Equal) = softmax([logit(first token of " Equal"), logit(first token of " Not Equal")])[1]

read from the reviewer's next-token distribution after the prompt, in one batched forward pass. At 0.5
it makes the same decision as the text judge. :func:`parse_judgement` is the text judge for API
backends that only return text.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from teams_rl_jax.errors import ConfigError

# Our wording of the paper's comparison prompt (WizardLM's equality check), Vicuna chat format.
JUDGE_INSTRUCTION = (
    "Here are two instructions written for an AI assistant. Decide whether they are equal, meaning that "
    "they have the same constraints and requirements, and the same depth and breadth of inquiry.\n"
    "First instruction: {old}\n"
    "Second instruction: {new}\n"
    "Answer with exactly one of: Equal, Not Equal. Do not explain."
)
ANSWERS = (" Equal", " Not Equal")  # index 1 = information gain = reward


def judge_prompt(old: str, new: str, template: str = "vicuna") -> str:
    """The full reviewer prompt comparing ``old`` and ``new`` (Vicuna chat format by default)."""
    from teams_rl_jax.data.templates import format_prompt

    return format_prompt(template, JUDGE_INSTRUCTION.format(old=old.strip(), new=new.strip()))


def judge_prompt_pieces(template: str = "vicuna") -> tuple[str, str, str]:
    """The prompt split around the two instructions: ``(before_old, between, after_new)``."""
    marker_old, marker_new = "\x00OLD\x00", "\x00NEW\x00"
    full = judge_prompt(marker_old, marker_new, template)
    before, rest = full.split(marker_old)
    between, after = rest.split(marker_new)
    return before, between, after


def answer_token_ids(tokenizer) -> tuple[int, int]:
    """First token ids of the two answers (``" Equal"``, ``" Not Equal"``) for ``tokenizer``.

    Raises ConfigError if they coincide (the next-token judge would be undefined).
    """
    ids = []
    for ans in ANSWERS:
        toks = tokenizer(ans, add_special_tokens=False)["input_ids"]
        if not toks:
            raise ConfigError(f"reviewer tokenizer produces no token for {ans!r}")
        ids.append(int(toks[0]))
    if ids[0] == ids[1]:
        raise ConfigError(f"reviewer tokenizer gives the same first token for {ANSWERS[0]!r} and {ANSWERS[1]!r}")
    return ids[0], ids[1]


def not_equal_probability(logits_last: jax.Array, answer_ids: tuple[int, int] | jax.Array) -> jax.Array:
    """``P(Not Equal)`` ``[B]`` from next-token logits ``[B, V]``: softmax over the two answer tokens."""
    two = jnp.take(logits_last, jnp.asarray(answer_ids), axis=-1).astype(jnp.float32)
    return jax.nn.softmax(two, axis=-1)[..., 1]


def judge_reward(lm, params, prompt_ids: jax.Array, prompt_mask: jax.Array, answer_ids) -> jax.Array:
    """Reviewer reward ``P(Not Equal)`` for left-padded judge prompts ``[B, T]`` in one forward pass."""
    logits, _, _ = lm.module.apply({"params": params}, prompt_ids, prompt_mask.astype(jnp.int32),
                                   _positions(prompt_mask), None, None, True)
    return not_equal_probability(logits[:, -1], answer_ids)


def _positions(mask: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)


_NOT_EQUAL = re.compile(r"\bnot\s+equal\b|\bunequal\b|\bdifferent\b", re.IGNORECASE)
_EQUAL = re.compile(r"\bequal\b|\bsame\b", re.IGNORECASE)


def parse_judgement(text: str) -> float | None:
    """Text judge: 1.0 for "Not Equal", 0.0 for "Equal", ``None`` when the reply says neither."""
    if _NOT_EQUAL.search(text):
        return 1.0
    if _EQUAL.search(text):
        return 0.0
    return None


def reviewer_term(lm, tokenizer, *, template: str = "vicuna", name: str = "reviewer"):
    """The judge as an env reward term: ``(RewardTerm, term_params)`` for ``env.make(reward_terms=...)``.

    The prompt is assembled inside the jitted step from the old and new instruction buffers
    (``env.assemble``); one reviewer query per call. ``term_params`` is the reviewer's weights, so
    pass ``term_params={name: params}`` to ``make`` and weight ``name`` in ``reward_weights``.
    """
    from teams_rl_jax.env.assemble import concat_left_padded
    from teams_rl_jax.env.llm_operator import tokenize_pieces
    from teams_rl_jax.env.rewards import RewardTerm

    before, between, after = judge_prompt_pieces(template)
    pre_ids, pre_len = tokenize_pieces(tokenizer, [before], add_bos=True)
    mid_ids, mid_len = tokenize_pieces(tokenizer, [between])
    post_ids, post_len = tokenize_pieces(tokenizer, [after])
    answers = answer_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    fixed = pre_ids.shape[1] + mid_ids.shape[1] + post_ids.shape[1]

    def fn(key, old, new, aux):
        B = old.tokens.shape[0]
        rows = lambda a, n: (jnp.broadcast_to(jnp.asarray(a[0]), (B, a.shape[1])), jnp.full((B,), int(n[0])))  # noqa: E731
        ids, mask = concat_left_padded([rows(pre_ids, pre_len), (old.tokens, old.length), rows(mid_ids, mid_len),
                                        (new.tokens, new.length), rows(post_ids, post_len)],
                                       fixed + old.tokens.shape[1] + new.tokens.shape[1], pad)
        return judge_reward(lm, aux["params"], ids, mask, answers)

    return RewardTerm(name, fn, role="reviewer", cost=1.0), lm.params
