"""The paper preset's policy-stage env (issue 18): reward = the reviewer's decoded reply parsed with the
reference's exact rule, the reference's one-hot observation, no elimination penalties, the
reference's cost logged, and truncated rewrites reported as their own elimination reason.

The roles are stub Backends (the protocol of ``backends/base.py``) with known, deterministic rules, so
every verdict is known: a tiny random model would make the verdicts random and the reward check empty.
Mutations tried are listed in each test's docstring.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from teams_rl_jax import config as cfglib
from teams_rl_jax.backends.base import Completion, QueryCounter
from teams_rl_jax.env import make
from teams_rl_jax.env.factory import _reviewer
from teams_rl_jax.env.operations import REFERENCE_ORDER
from teams_rl_jax.env.rewards import RewardTerm
from teams_rl_jax.errors import ConfigError
from teams_rl_jax.rl import PolicyConfig
from teams_rl_jax.rl.stage import run_policy_stage

SEED = 20180
N = 6
WORDS = "explain describe compare the causes effects of rain frost wind light with three examples".split()


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


class StubInstructor:
    """Rewrites into a few words picked by a hash of the prompt; every 5th prompt (by hash) is cut by
    ``max_new_tokens`` (``finish_reason="length"``). Records which rows it cut, in call order."""

    def __init__(self, counter):
        self.role, self.model, self.counter, self.cut = "instructor", "stub", counter, []

    def complete(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, stop=None, seed=None):
        self.counter.add(self.role, len(prompts))
        out = []
        for p in prompts:
            h = _crc(str(p))
            words = [WORDS[(h >> (3 * i)) % len(WORDS)] for i in range(3 + h % 5)]
            cut = h % 5 == 0
            self.cut.append(cut)
            out.append(Completion(" ".join(words).capitalize() + ".", None, "length" if cut else "stop"))
        return out

    def score(self, prompts, continuations):
        raise NotImplementedError


class StubReviewer:
    """Answers by a known rule on the whole judge prompt: "Not Equal" iff its hash is even (the
    inverse rule with ``invert``); ``reply`` rewrites the "Not Equal" answer (e.g. "Not Equal."). Records
    every reply, in call order."""

    def __init__(self, counter, invert=False, reply="Not Equal"):
        self.role, self.model, self.counter = "reviewer", "stub", counter
        self.invert, self.reply, self.replies = invert, reply, []

    def complete(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, stop=None, seed=None):
        assert temperature == 0.0  # the reviewer decodes greedily
        self.counter.add(self.role, len(prompts))
        out = []
        for p in prompts:
            not_equal = (_crc(p[-1]["content"]) % 2 == 0) != self.invert
            self.replies.append(self.reply if not_equal else "Equal")
            out.append(Completion(self.replies[-1]))
        return out

    def score(self, prompts, continuations):
        raise NotImplementedError


PAPER_ENV = {"reward": "reviewer_binary", "observation": "paper", "elimination_penalties": False,
             "revert_eliminated": False, "max_len": 96, "max_seeds": 8}


def _env(invert=False, reply="Not Equal", **overrides):
    counter = QueryCounter()
    ins, rev = StubInstructor(counter), StubReviewer(counter, invert, reply)
    env, params = make("llm", {**PAPER_ENV, **overrides}, roles={"instructor": ins, "reviewer": rev})
    return env, params, ins, rev


def _steps(env, params, seed, steps=4):
    """Step ``N`` envs with seeded random actions; per step ``(reward, info)`` as numpy."""
    key = jax.random.PRNGKey(seed)
    _, state = env.reset_batch(jax.random.split(key, N), params)
    step = jax.jit(env.step_batch)
    out = []
    for t in range(steps):
        key, k_a, k_s = jax.random.split(key, 3)
        action = jax.random.randint(k_a, (N,), 0, env.num_actions)
        obs, state, reward, _, info = step(k_s, state, action, params)
        out.append((np.asarray(action), np.asarray(obs), np.asarray(reward), jax.device_get(info)))
    return out


@pytest.mark.parametrize("seed", [SEED, SEED + 1])
def test_reward_is_the_reviewers_exact_verdict_and_follows_its_inversion(seed):
    """Mutations caught: reward_binary taking the shaped sum (env.environment._reward_terms), the
    elimination penalties still charged, the verdict inverted or thresholded in host_reviewer_term, the
    exact parser replaced by the lenient one ("Not Equal." scored 1)."""
    results = {}
    for name, kw in {"rule": {}, "inverse": {"invert": True}, "period": {"reply": "Not Equal."}}.items():
        env, params, ins, rev = _env(**kw)
        assert env.host_roles == ("instructor", "reviewer")
        steps = _steps(env, params, seed)
        rewards = np.stack([r for _, _, r, _ in steps])
        want = np.asarray([1.0 if x.strip() == "Not Equal" else 0.0 for x in rev.replies]).reshape(rewards.shape)
        assert len(rev.replies) == rewards.size, f"seed={seed}: one reviewer query per step"
        np.testing.assert_array_equal(rewards, want, err_msg=f"seed={seed} {name}")
        for _, _, _, info in steps:
            np.testing.assert_array_equal(info["queries"]["reviewer"], 1.0)
            np.testing.assert_array_equal(info["penalty"], 0.0)
            np.testing.assert_array_equal(info["paper_cost"], 1.0)
        results[name] = rewards
    # Same actions and instructor rewrites: the inverse rule gives the other verdict on every step.
    np.testing.assert_array_equal(results["inverse"], 1.0 - results["rule"], err_msg=f"seed={seed}")
    assert 0 < results["rule"].mean() < 1, f"seed={seed}: both verdicts occur"
    np.testing.assert_array_equal(results["period"], 0.0, err_msg=f"seed={seed}: 'Not Equal.' is not exact")


def test_truncated_rewrites_are_their_own_reason_and_paper_observation_is_the_reference_one_hot():
    """Mutations caught: the host operator not reporting its cut rows (info 'truncated' all False),
    the reason masked out, the paper one-hot in our action order instead of the reference's."""
    env, params, ins, _ = _env()
    assert env.observation_size(params) == len(REFERENCE_ORDER)
    obs0, _ = env.reset_batch(jax.random.split(jax.random.PRNGKey(SEED), N), params)
    np.testing.assert_array_equal(np.asarray(obs0), 0.0)
    steps = _steps(env, params, SEED, steps=5)
    cut = np.asarray(ins.cut).reshape(len(steps), N)
    assert cut.any(), f"seed={SEED}: the stub cuts some rewrites"
    for (action, obs, _, info), c in zip(steps, cut):
        np.testing.assert_array_equal(info["eliminated"]["truncated"], c)
        ref = [REFERENCE_ORDER.index(env.operations[a]) for a in action]
        np.testing.assert_array_equal(obs, np.eye(len(REFERENCE_ORDER))[ref])


def test_policy_stage_trains_in_the_paper_preset_and_its_returns_are_the_verdicts(tmp_path):
    """The Done-when test: TRPO on the LLM env in the paper preset (reward reviewer_binary, observation
    paper, no elimination penalties) with stub roles; the returns are the reviewer's exact verdicts (and
    follow the inverse rule), and the summary counts the reference's cost and truncated rewrites.
    Mutations caught: the stage's rows dropping 'paper_cost' / 'eliminated', reward wiring as above."""
    cfg = {"algo": "trpo", "env": "llm", "num_envs": 4, "num_steps": 6, "num_updates": 3, "hidden_sizes": [8],
           "seed": SEED, "env_config": PAPER_ENV}
    totals = {}
    for invert in (False, True):
        counter = QueryCounter()
        ins, rev = StubInstructor(counter), StubReviewer(counter, invert)
        config = cfglib.from_dict(PolicyConfig, cfg, "policy")
        summary = run_policy_stage(config, tmp_path / f"run{invert}", roles={"instructor": ins, "reviewer": rev},
                                   log=lambda _: None)
        rows = [yaml.safe_load(x) for x in (tmp_path / f"run{invert}" / "policy" / "curves.jsonl").read_text().splitlines()]
        verdicts = sum(x.strip() == "Not Equal" for x in rev.replies)
        returns = sum(r["return"] * config.num_envs for r in rows)
        assert returns == pytest.approx(verdicts), f"seed={SEED} invert={invert}"
        steps = counter.snapshot()["reviewer"]
        assert summary["policy"]["paper_cost"] == pytest.approx(steps)
        assert summary["policy"]["eliminated"]["truncated"] == pytest.approx(sum(ins.cut))
        assert sum(ins.cut) > 0
        totals[invert] = (verdicts, steps)
    assert totals[False][0] != totals[True][0]


def test_reviewer_forms_follow_the_reward_setting():
    """A text reviewer decodes under reviewer_binary (on the host, the exact parser when no config names
    one); reviewer_soft needs the jitted judge (the in-process forms: tests/test_decoded_judge.py)."""
    term, params, on_host = _reviewer(StubReviewer(QueryCounter()), None, {}, jitted_ok=True,
                                      reward="reviewer_binary")
    assert on_host and params is None and term.verdict == "decoded"
    with pytest.raises(ConfigError, match="reviewer_soft"):
        _reviewer(StubReviewer(QueryCounter()), None, {}, jitted_ok=True, reward="reviewer_soft")
    with pytest.raises(ConfigError, match="reviewer_binary needs one reviewer"):
        make("token_edit", {"reward": "reviewer_binary"})
    with pytest.raises(ConfigError, match="reviewer_soft needs an in-process"):
        _env(reward="reviewer_soft")
    decoded = RewardTerm("reviewer", lambda k, b, a, x: jnp.zeros(b.length.shape), role="reviewer", cost=1.0,
                         verdict="decoded")
    with pytest.raises(ConfigError, match="verdict is 'soft'"):
        make("token_edit", {"reward": "reviewer_soft"}, reward_terms=[decoded])


def test_default_reward_is_unchanged_shaped():
    """The default (shaped) reward and penalties of the token-edit env are today's."""
    env, params = make("token_edit")
    assert env.config.reward == "shaped" and env.config.observation == "embedding"
    assert env.term_names == ("novelty", "length_gain", "distinct_gain")
    np.testing.assert_array_equal(np.asarray(params.weights), [1.0, 0.5, 0.5])
    np.testing.assert_array_equal(np.asarray(params.penalties), 1.0)
    _, p2 = make("token_edit", {"elimination_penalties": False})
    np.testing.assert_array_equal(np.asarray(p2.penalties), 0.0)


def test_paper_cost_is_one_per_operation_applied_and_stop_is_free():
    """The reference's cost: 1 per operation applied, 0 for stop (its unused none_query_action), beside
    our per-role queries. Mutation caught: paper_cost charged on stopped rows."""
    env, params, _, _ = _env(operations=list(REFERENCE_ORDER) + ["stop"])
    _, state = env.reset_batch(jax.random.split(jax.random.PRNGKey(SEED), N), params)
    action = jnp.asarray([0, env.stop_action] * (N // 2), jnp.int32)
    obs, _, reward, _, info = jax.jit(env.step_batch)(jax.random.PRNGKey(SEED + 2), state, action, params)
    applied = np.asarray(action) != env.stop_action
    np.testing.assert_array_equal(np.asarray(info["paper_cost"]), applied.astype(float))
    np.testing.assert_array_equal(np.asarray(info["queries"]["reviewer"]), applied.astype(float))
    np.testing.assert_array_equal(np.asarray(obs)[~applied], 0.0)  # stop has no place in the reference's one-hot
