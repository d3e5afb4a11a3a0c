"""The in-process reviewer under ``reward: reviewer_binary`` (the paper preset with local roles): the
judge prompt is decoded greedily inside the jitted env step and only the reply is parsed on the host
(``env.judge.decoded_reviewer_term``), so a step sharded over several devices cannot deadlock (the
shipped paper presets run on 8 simulated devices in ``test_shipped_configs.py``).

The reference is the text reviewer over the same loaded model (``roles.reviewer.Reviewer`` through the
backend's own batched ``complete``): the verdicts must be equal row for row. The tiny model's output
head boosts only "Not", "Equal" and EOS, so its greedy replies are strings of those words and the
verdicts are mixed (asserted): a model that always says the same thing would make the check empty.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from teams_rl_jax.backends.config import RoleConfig
from teams_rl_jax.backends.flax_backend import FlaxBackend
from teams_rl_jax.env.buffers import Instruction, encode, pad_rows
from teams_rl_jax.env.factory import _reviewer
from teams_rl_jax.env.judge import decoded_reviewer_term
from teams_rl_jax.env.seeds import offline_tokenizer
from teams_rl_jax.evolve.records import read_seeds
from teams_rl_jax.models import init, save_pretrained
from teams_rl_jax.roles.reviewer import Reviewer

SEED = 7
ROWS = 24
NEW_TOKENS = 4


def _checkpoint(path, sign: float):
    """A tiny random Llama (float32) whose head columns for "Not", "Equal" and EOS are scaled x40
    (``sign`` flips the "Not" column: the "inverted" reviewer)."""
    from tokenizers import processors

    tok = offline_tokenizer([s.text for s in read_seeds()] + ["Answer Equal or Not Equal."], vocab_size=4096)
    # Llama-style: tokenizer(text) adds BOS, so both the env and the text reviewer prepend it (issue 19: both
    # follow the tokenizer's own front specials; seed 7's mixed verdicts were found with a BOS).
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                                  special_tokens=[("<s>", tok.bos_token_id)])
    tok.save_pretrained(str(path))
    vocab = (len(tok) + 63) // 64 * 64
    lm = init(dict(model_type="llama", vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                   initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=0), jax.random.key(SEED))
    not_id, equal_id = tok.convert_tokens_to_ids(["Not", "Equal"])
    head = np.array(lm.params["lm_head"]["kernel"])
    head[:, [not_id, equal_id, 2]] *= 40.0
    head[:, not_id] *= sign
    save_pretrained(lm, path, {**lm.params, "lm_head": {"kernel": jnp.asarray(head)}})
    return path


def _pairs():
    seeds = [s.text for s in read_seeds()][: 2 * ROWS]
    return seeds[:ROWS], seeds[ROWS:]


def _instruction(tok, texts, width=64):
    ids, lens = pad_rows([encode(tok, t)[:width] for t in texts], width)
    n = len(texts)
    return Instruction(jnp.asarray(ids), jnp.asarray(lens), jnp.zeros((n, 1)), jnp.zeros((n,), jnp.int32))


def _verdicts(path, parser):
    backend = FlaxBackend.from_config(RoleConfig(backend="flax", checkpoint=str(path), dtype="float32"),
                                      role="reviewer")
    tok = backend.tokenizer
    olds, news = _pairs()
    old, new = _instruction(tok, olds), _instruction(tok, news)
    # The buffers are what the step sees: the reference judges the same (cut, decoded) texts.
    olds = [tok.decode(list(r[:n])) for r, n in zip(np.asarray(old.tokens), np.asarray(old.length))]
    news = [tok.decode(list(r[:n])) for r, n in zip(np.asarray(new.tokens), np.asarray(new.length))]
    term, params = decoded_reviewer_term(backend.lm, tok, parser=parser, max_new_tokens=NEW_TOKENS,
                                         env_tokenizer=tok, checkpoint=str(path))
    active = jnp.arange(ROWS) % 5 != 4  # every 5th row finished: judged 0, not counted
    got = jax.jit(term.fn)(jax.random.key(SEED), old, new, {"params": params, "active": active})
    ref = Reviewer(backend, NEW_TOKENS, parser).judge(olds, news)
    ref = np.asarray([0.0 if v is None else v for v in ref], np.float32)
    return np.asarray(got), ref, np.asarray(active), term


@pytest.mark.parametrize("parser", ["exact", "lenient"])
def test_decoded_judge_equals_the_text_reviewer_and_follows_its_inversion(tmp_path, parser):
    """Catches: the verdict read from the wrong rows or tokens, EOS/pad not cut before parsing, a sampled
    (not greedy) reply, finished rows judged or counted, a reward that ignores the reply."""
    runs = {}
    for sign in (1.0, -1.0):
        got, ref, active, term = _verdicts(_checkpoint(tmp_path / f"ckpt{sign}", sign), parser)
        np.testing.assert_array_equal(got[~active], 0.0, err_msg=f"seed {SEED}: a finished row was judged")
        np.testing.assert_array_equal(got[active], ref[active], err_msg=f"seed {SEED}, parser {parser}, sign {sign}")
        assert term.verdict == "decoded" and term.fn.stats["rows"] == int(active.sum())
        runs[sign] = got
    both = np.concatenate(list(runs.values()))
    assert 0 < both.sum() < both.size, f"seed {SEED}: the verdicts are not mixed ({both.tolist()}): the check is empty"
    assert not np.array_equal(runs[1.0], runs[-1.0]), f"seed {SEED}: inverting the reviewer changed no verdict"


def test_in_process_reviewer_takes_the_jitted_forms(tmp_path):
    """reviewer_binary with an in-process reviewer on the env's tokenizer is the decoded jitted judge (not
    the text reviewer in a host callback, which deadlocks a sharded step); reviewer_soft the logit judge.
    Catches: the binary reward routed to the soft judge or to the host."""
    path = _checkpoint(tmp_path / "ckpt", 1.0)
    backend = FlaxBackend.from_config(RoleConfig(backend="flax", checkpoint=str(path), dtype="float32"),
                                      role="reviewer")
    for reward, verdict in (("reviewer_binary", "decoded"), ("reviewer_soft", "soft")):
        term, params, on_host = _reviewer(backend, backend.tokenizer, {}, jitted_ok=True, reward=reward)
        assert not on_host and params is not None and term.verdict == verdict


def test_policy_stage_in_the_paper_preset_with_in_process_roles_returns_the_decoded_verdicts(tmp_path):
    """The Done-when test with tiny in-process roles: TRPO on the LLM env in the paper preset (reward
    reviewer_binary, exact parser, observation paper, no penalties), instructor and reviewer Flax models
    in the jitted step. The returns summed over the run equal the reviewer's Not Equal verdicts as its
    decoded replies were parsed, and the inverted reviewer changes them. Catches: the reward taken from
    anything but the verdict (the shaped sum, P(Not Equal)), the penalties charged, verdicts lost."""
    from teams_rl_jax import config as cfglib
    from teams_rl_jax.backends.config import RolesConfig
    from teams_rl_jax.rl import PolicyConfig
    from teams_rl_jax.rl.stage import run_policy_stage

    env_config = {"reward": "reviewer_binary", "observation": "paper", "elimination_penalties": False,
                  "revert_eliminated": False, "max_seeds": 8, "temperature": 0.7}
    cfg = cfglib.from_dict(PolicyConfig, {"algo": "trpo", "env": "llm", "num_envs": 4, "num_steps": 6,
                                          "num_updates": 2, "hidden_sizes": [8], "seed": SEED,
                                          "env_config": env_config}, "policy")
    totals = {}
    for sign in (1.0, -1.0):
        path = _checkpoint(tmp_path / f"ckpt{sign}", sign)
        role = {"backend": "flax", "checkpoint": str(path), "dtype": "float32"}
        roles = cfglib.from_dict(RolesConfig, {"instructor": {**role, "max_new_tokens": 48},
                                               "reviewer": {**role, "max_new_tokens": NEW_TOKENS, "parser": "exact"}},
                                 "roles")
        run = tmp_path / f"run{sign}"
        logs = []
        summary = run_policy_stage(cfg, run, roles=roles, log=logs.append)
        assert not any("host-step" in line for line in logs), "in-process roles take the jitted loop"
        rows = [json.loads(x) for x in (run / "policy" / "curves.jsonl").read_text().splitlines()]
        returns = sum(r["return"] * cfg.num_envs for r in rows)
        stats = summary["roles"]["reviewer"]
        assert stats["rows"] > 0 and returns == pytest.approx(stats["not_equal"]), f"seed {SEED} sign {sign}: {stats}"
        assert summary["policy"]["paper_cost"] == pytest.approx(stats["rows"])
        totals[sign] = stats["not_equal"]
    assert totals[1.0] != totals[-1.0], f"seed {SEED}: inverting the reviewer changed no verdict ({totals})"
