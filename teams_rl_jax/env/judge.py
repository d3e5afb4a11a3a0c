"""The reviewer judge: does the evolved instruction add constraints or depth over the old one?

TeaMs-RL's reviewer answers a comparison prompt with "Equal" or "Not Equal"; "Not Equal" means the
evolution gained something (reward 1), "Equal" means no information gain (WizardLM's first elimination
rule). We keep the decision but make it dense and parse-free for a local reviewer LM: the reward is

    P(Not Equal) = softmax([logit(first token of " Equal"), logit(first token of " Not Equal")])[1]

read from the reviewer's next-token distribution after the prompt, in one batched forward pass. At 0.5
it makes the same decision as the text judge. API backends that only return text go through the
text reviewer (``roles.reviewer``: the same prompt, ``judge_messages``, and its reply parsers).

The prompt is in the reviewer's own chat format (its chat template, else Vicuna v1.1). The answer
token ids are read in context: the first token of prompt + answer after the prompt (``▁Equal``
after ``ASSISTANT:`` in a Llama-2 vocabulary; ``Equal`` after Llama-3's ``<|end_header_id|>\n\n``),
and the prompt's fixed pieces likewise (``env.pieces``), verified token for token against the full
prompt's encoding.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.experimental  # noqa: F401  (io_callback)
import jax.numpy as jnp
import numpy as np

from teams_rl_jax.data.chat import render_chat
from teams_rl_jax.data.tokenizer import check_same_tokenizer, choose_pad_id, eos_token_ids, tokenizer_fingerprint
from teams_rl_jax.env.assemble import concat_left_padded
from teams_rl_jax.env.pieces import place_slots, template_ids
from teams_rl_jax.env.rewards import RewardTerm
from teams_rl_jax.errors import ConfigError
from teams_rl_jax.generation import generate
from teams_rl_jax.roles.reviewer import EQUAL, JUDGE_INSTRUCTION, NOT_EQUAL, judge_messages, parse_reply  # the one reviewer prompt

ANSWERS = (" Equal", " Not Equal")  # index 1 = information gain = reward


def judge_prompt(old: str, new: str, tokenizer=None) -> str:
    """The full reviewer prompt text in ``tokenizer``'s chat format (None: Vicuna v1.1 wording)."""
    return render_chat(tokenizer, judge_messages(old, new))


def judge_template_ids(tokenizer, *, instruction: str = JUDGE_INSTRUCTION, chat: bool = True):
    """Verified in-context ids of the judge prompt's three fixed pieces and of the two answers'
    first tokens (:func:`teams_rl_jax.env.pieces.template_ids`)."""
    def render(values, seps):
        content = place_slots(instruction, ("old", "new"), seps)
        content = content.replace("{old}", "\x01").replace("{new}", "\x02")
        content = content.replace("\x01", values[0]).replace("\x02", values[1])
        return render_chat(tokenizer if chat else None, [{"role": "user", "content": content}])

    return template_ids(tokenizer, render, 2, answers=ANSWERS, what="judge prompt")


def answer_token_ids(tokenizer) -> tuple[int, int]:
    """First token ids of the answers ``"Equal"`` / ``"Not Equal"`` where the reviewer would write them:
    from the encoding of the judge prompt + answer, minus the prompt (not the answer tokenized alone,
    which with a Llama-2 ``tokenizer.json`` starts with a lone ``▁`` piece).

    Raises ConfigError if they coincide (the next-token judge would be undefined).
    """
    ids = judge_template_ids(tokenizer).answers
    return int(ids[0]), int(ids[1])


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


def reviewer_term(lm, tokenizer, *, env_tokenizer=None, name: str = "reviewer", chat: bool = True,
                  instruction: str = JUDGE_INSTRUCTION):
    """The judge as an env reward term: ``(RewardTerm, term_params)`` for ``env.make(reward_terms=...)``.

    The prompt is assembled inside the jitted step from the old and new instruction buffers
    (``env.assemble``) and the judge template's in-context piece ids (``judge_template_ids``); one
    reviewer query per call. ``term_params`` is the reviewer's weights, so pass
    ``term_params={name: params}`` to ``make`` and weight ``name`` in ``reward_weights``.

    ``env_tokenizer``: the env's tokenizer. The buffers hold the env's ids and are fed to the reviewer
    as they are, so the two tokenizers must be the same; a different one raises ConfigError (compare
    with ``check_role_tokenizers`` in ``make``; the text path of the host env handles differing ones).
    ``instruction``: the judge template (``{old}``, ``{new}``; a ``prompts:`` file's ``judge``).
    """
    if env_tokenizer is not None:
        check_same_tokenizer(env_tokenizer, tokenizer, "env and reviewer")
    ids = judge_template_ids(tokenizer, instruction=instruction, chat=chat)
    answers = ids.answers
    pad = choose_pad_id(tokenizer, eos_token_ids(tokenizer))

    def fn(key, old, new, aux):
        prompt, mask = judge_prompt_ids(ids.pieces, old.tokens, old.length, new.tokens, new.length, pad)
        return judge_reward(lm, aux["params"], prompt, mask, answers)

    fn.tokenizer_fingerprint = tokenizer_fingerprint(tokenizer)
    return RewardTerm(name, fn, role="reviewer", cost=1.0, verdict="soft"), lm.params


def decoded_reviewer_term(lm, tokenizer, *, parser: str = "exact", max_new_tokens: int = 8, env_tokenizer=None,
                          name: str = "reviewer", chat: bool = True, instruction: str = JUDGE_INSTRUCTION,
                          checkpoint: str | None = None):
    """The paper's reviewer (``reward: reviewer_binary``) in-process: ``(RewardTerm, term_params)``.

    The same judge prompt as :func:`reviewer_term`, assembled inside the jitted step, is *decoded*
    greedily for ``max_new_tokens`` tokens (``teams_rl_jax.generate``, the weights a traced
    argument), and the reply is parsed with ``parser`` (``exact``: the reference's rule) on the host.
    Only the parse leaves the device (an ``io_callback`` over the reply ids, no device work inside
    it): a callback that ran the reviewer model itself would deadlock a step sharded over several
    devices (the other devices' threads wait in the step's collectives while the callback's program
    waits for them). 1.0 = Not Equal; Equal and an unparseable reply are 0.0. ``term.fn.stats`` counts
    ``calls``, judged ``rows``, ``unparseable`` replies and ``not_equal`` verdicts (the policy summary's
    ``roles.reviewer``).
    """
    if env_tokenizer is not None:
        check_same_tokenizer(env_tokenizer, tokenizer, "env and reviewer")
    ids = judge_template_ids(tokenizer, instruction=instruction, chat=chat)
    eos = tuple(eos_token_ids(tokenizer, lm.config, checkpoint))
    pad = choose_pad_id(tokenizer, eos)
    stats = {"calls": 0, "rows": 0, "unparseable": 0, "not_equal": 0}

    def parse(reply_ids, active):
        out = np.zeros(reply_ids.shape[0], np.float32)
        rows = np.nonzero(np.asarray(active))[0]
        for r in rows:
            row = [int(t) for t in np.asarray(reply_ids[r]) if int(t) != pad]
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            verdict = parse_reply(tokenizer.decode(row[:cut], skip_special_tokens=True), parser)
            stats["unparseable"] += verdict is None
            out[r] = EQUAL if verdict is None else verdict
        stats["not_equal"] += int(np.sum(out[rows] == NOT_EQUAL))
        stats["calls"] += 1
        stats["rows"] += int(rows.size)
        return out

    def fn(key, old, new, aux):
        prompt, mask = judge_prompt_ids(ids.pieces, old.tokens, old.length, new.tokens, new.length, pad)
        reply = generate(lm, aux["params"], prompt, mask, max_new_tokens=max_new_tokens, rng=key, temperature=0.0,
                         eos_token_id=eos, pad_token_id=pad)
        active = aux.get("active")
        if active is None:
            active = jnp.ones(old.length.shape, bool)
        return jax.experimental.io_callback(parse, jax.ShapeDtypeStruct(old.length.shape, jnp.float32), reply, active,
                                            ordered=False)

    fn.tokenizer_fingerprint = tokenizer_fingerprint(tokenizer)
    fn.stats = stats
    return RewardTerm(name, fn, role="reviewer", cost=1.0, verdict="decoded"), lm.params


def judge_prompt_ids(pieces, old_tokens, old_len, new_tokens, new_len, pad_id: int):
    """Left-padded reviewer prompts ``(ids, mask) [B, W]``: ``pieces[0] + old + pieces[1] + new + pieces[2]``
    (``pieces`` from :func:`judge_template_ids`; buffers right-padded ``[B, L]`` with lengths ``[B]``)."""
    B = old_tokens.shape[0]

    def const(piece):
        piece = jnp.asarray(piece, jnp.int32).reshape(-1)
        return jnp.broadcast_to(piece, (B, piece.shape[0])), jnp.full((B,), piece.shape[0], jnp.int32)

    before, between, after = (const(p) for p in pieces)
    width = sum(len(p) for p in pieces) + old_tokens.shape[1] + new_tokens.shape[1]
    return concat_left_padded([before, (old_tokens, old_len), between, (new_tokens, new_len), after], width, pad_id)


def check_role_tokenizers(env_tokenizer, operator=None, terms: Sequence = ()) -> None:
    """Raise ConfigError when the instructor operator or a reward term (the reviewer) was built with a
    tokenizer other than the env's (their ``tokenizer_fingerprint``): ids would be mixed up silently."""
    want = tokenizer_fingerprint(env_tokenizer)
    parts = [("instructor operator", getattr(operator, "tokenizer_fingerprint", None))]
    parts += [(f"reward term {getattr(t, 'name', '?')!r}", getattr(getattr(t, "fn", None), "tokenizer_fingerprint", None))
              for t in terms]
    for what, fp in parts:
        if fp is not None and fp != want:
            raise ConfigError(f"env and {what}: tokenizers differ (vocabulary, merges or normalizer); their token ids "
                              "cannot be mixed in the jitted env: use one tokenizer, or the host (text) env path")
