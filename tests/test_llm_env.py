"""The LLM env with tiny random Llama instructor and reviewer: the batched step writes the
instructor's ids, the reviewer's judgement orders the rewards, and the policy stage builds the env
from YAML roles (in-process Flax: jitted; an HTTP role: the host-step loop, with a fake Backend).

Each test's docstring names the mutation it catches (also listed in tests/README.md).
"""

import dataclasses
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from teams_rl_jax import config as cfglib
from teams_rl_jax.backends.base import Completion, QueryCounter
from teams_rl_jax.backends.config import RolesConfig
from teams_rl_jax.data.tokenizer import build_word_tokenizer
from teams_rl_jax.env import OPERATIONS, STOP, make, operation_templates, phrases, read_seed_records
from teams_rl_jax.data.tokenizer import choose_pad_id, eos_token_ids
from teams_rl_jax.env.judge import (ANSWERS, JUDGE_INSTRUCTION, judge_prompt, judge_prompt_ids, judge_template_ids,
                                    reviewer_term)
from teams_rl_jax.env.llm_operator import LLMOperator
from teams_rl_jax.models import init, save_pretrained
from teams_rl_jax.rl import PolicyConfig
from teams_rl_jax.rl.stage import run_policy_stage

SEED = 1234
L = 48
ACTIONS = list(OPERATIONS) + [STOP]


@pytest.fixture(scope="module")
def tok_and_seeds():
    seeds, _ = read_seed_records(None, "instruction", 8)
    texts = list(seeds) + [p + s for p, s in operation_templates(OPERATIONS)] + [JUDGE_INSTRUCTION, *ANSWERS,
                                                                              judge_prompt("a", "b")]
    # Public phrase banks only: dunders such as __file__ would put the checkout's path into the vocabulary,
    # so token ids (and the random models' samples) would differ between checkouts.
    texts += [" ".join(v) if isinstance(v, (list, tuple)) else str(v) for k, v in sorted(vars(phrases).items())
              if not k.startswith("_") and isinstance(v, (list, tuple, str))]
    return build_word_tokenizer(texts, 4096), list(seeds)


def _lm(tok, seed):
    cfg = dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
               pad_token_id=0)
    return init(cfg, jax.random.key(seed))


def _ends_early(params, eos, push=5.0, gain=0.8):
    """A random instructor that often emits EOS within a few tokens (a random Llama almost never
    does, and a rewrite cut by ``max_new_tokens`` is discarded): every embedding gets a large
    component on dimension 0, which dominates the final RMS-normed state, and the head reads that
    dimension only into the EOS logit (P(EOS) ~ 0.2-0.3 per token; the rest stays random)."""
    emb = params["embed_tokens"]["embedding"].at[:, 0].add(push)
    head = params["lm_head"]["kernel"].at[0, :].set(0.0).at[0, eos].set(gain * float(np.sqrt(emb.shape[1])) / push)
    return {**params, "embed_tokens": {"embedding": emb}, "lm_head": {"kernel": head}}


@pytest.fixture(scope="module")
def llm_env(tok_and_seeds):
    tok, seeds = tok_and_seeds
    rng = np.random.default_rng(SEED)
    instructor, reviewer = _lm(tok, int(rng.integers(1 << 30))), _lm(tok, int(rng.integers(1 << 30)))
    op, op_params = LLMOperator.create(instructor, tok, operation_templates(OPERATIONS), max_len=L, max_new_tokens=12)
    op_params = op_params.replace(lm_params=_ends_early(instructor.params, eos=2))
    term, term_params = reviewer_term(reviewer, tok)
    # No elimination rules: every rewrite is kept, so the buffer must hold exactly what was generated.
    env, params = make("llm", tokenizer=tok, seeds=seeds, operator=op, operator_params=op_params,
                       reward_terms=[term], term_params={"reviewer": term_params}, max_len=L, operations=ACTIONS,
                       reward_weights={"reviewer": 1.0}, elimination={})
    return env, params, op, op_params, term, reviewer, tok


def test_batched_step_writes_the_instructors_ids_and_stop_costs_nothing(llm_env):
    """Mutations caught: the env dropping or misplacing the operator's output, action ids not
    mapped to the operator's ids when ``stop`` is among the actions, one operator call per row
    instead of the batch (the keys then differ), a stopped or finished row still charged queries."""
    env, params, op, op_params, *_ = llm_env
    stop = ACTIONS.index(STOP)
    actions = jnp.asarray([0, 5, 1, 3, 4, stop], jnp.int32)
    n = actions.shape[0]
    _, state = jax.jit(env.reset_batch)(jax.random.split(jax.random.key(SEED), n), params)
    key = jax.random.key(SEED + 1)
    _, new, reward, done, info = jax.jit(env.step_batch)(key, state, actions, params)
    # What the instructor writes for these rows in ONE batched call with the step's operator key
    # (stop rows carry op 0 there; their output is not used).
    k_op = jax.random.split(key)[0]
    want_t, want_n, _ = jax.jit(op.apply)(k_op, jnp.where(actions == stop, 0, actions), state.instruction.tokens,
                                          state.instruction.length, op_params)
    old = lambda i: np.asarray(state.instruction.tokens[i, : int(state.instruction.length[i])])  # noqa: E731
    changed = 0
    for i in range(n - 1):
        got = np.asarray(new.instruction.tokens[i, : int(new.instruction.length[i])])
        np.testing.assert_array_equal(got, np.asarray(want_t[i, : int(want_n[i])]), err_msg=f"seed {SEED} row {i}")
        changed += not np.array_equal(got, old(i))
    # At least one row must really change, or the equality above compares nothing (rows cut by the limit
    # or emptied keep the old text; how many depends on the sampled tokens).
    assert changed >= 1, f"seed {SEED}: no row rewritten (all cut or empty): nothing to compare"
    np.testing.assert_array_equal(np.asarray(info["queries"]["instructor"]), [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(np.asarray(info["queries"]["reviewer"]), [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(np.asarray(done), [False] * (n - 1) + [True])
    np.testing.assert_array_equal(np.asarray(new.instruction.tokens[-1]), np.asarray(state.instruction.tokens[-1]))
    assert float(reward[-1]) == 0.0
    # A finished row costs nothing on the next step either.
    _, _, _, _, info2 = jax.jit(env.step_batch)(key, new, jnp.ones((n,), jnp.int32), params)
    np.testing.assert_array_equal(np.asarray(info2["queries"]["instructor"]), [1, 1, 1, 1, 1, 0])


def test_reviewer_judgement_orders_the_rewards(llm_env):
    """Mutations caught: the reward not read from the reviewer's " Not Equal" vs " Equal" logits
    (``not_equal_probability`` flipped, swapped answers, the wrong position), the judge prompt
    assembled from other buffers than the step's old and new instructions. The reviewer's head is
    set (from our own forward pass) so that it says "Not Equal" for row 0 and "Equal" for row 1."""
    env, params, op, op_params, term, reviewer, tok = llm_env
    n = 2
    _, state = jax.jit(jax.vmap(env.reset_to, in_axes=(0, None)))(jnp.arange(n), params)  # two different seeds
    actions = jnp.asarray([0, 3], jnp.int32)
    key = jax.random.key(SEED + 6)
    # The rows' features at the judge's last position, read by our own forward pass over the judge
    # prompt of this step's (old, new) buffers, with an identity head (not through the term, so the
    # oracle does not share the code under test).
    _, after, _, _, _ = jax.jit(env.step_batch)(key, state, actions, params)
    tmpl = judge_template_ids(tok)
    eq, ne = (int(i) for i in tmpl.answers)
    base = params.term_params["reviewer"]
    D = base["lm_head"]["kernel"].shape[0]
    ids, mask = judge_prompt_ids(tmpl.pieces, state.instruction.tokens, state.instruction.length,
                                 after.instruction.tokens, after.instruction.length,
                                 choose_pad_id(tok, eos_token_ids(tok)))
    eye = jnp.zeros_like(base["lm_head"]["kernel"]).at[:, :D].set(jnp.eye(D))
    logits = jax.jit(reviewer.apply)({**base, "lm_head": {"kernel": eye}}, ids, mask)
    feats = np.asarray(logits[:, -1, :D], np.float64)  # [n, D]
    assert np.abs(feats[0] - feats[1]).max() > 1e-3, f"seed {SEED}: both rows look the same to the reviewer"
    # A direction with feature . d = +4 on row 0 and -4 on row 1 (least-norm solution).
    d = feats.T @ np.linalg.solve(feats @ feats.T, np.asarray([4.0, -4.0]))
    head = base["lm_head"]["kernel"].at[:, eq].set(0.0).at[:, ne].set(jnp.asarray(d, jnp.float32))
    params2 = params.replace(term_params={"reviewer": {**base, "lm_head": {"kernel": head}}})
    _, _, reward, _, info = jax.jit(env.step_batch)(key, state, actions, params2)
    judge = np.asarray(info["reward_terms"]["reviewer"])
    np.testing.assert_allclose(judge, 1 / (1 + np.exp([-4.0, 4.0])), rtol=1e-3, err_msg=f"seed {SEED}")
    assert float(reward[0]) > 0.9 and float(reward[1]) < 0.1  # reward = 1.0 * P(Not Equal)


def _save_checkpoints(tmp_path, tok):
    dirs = []
    for name, seed in (("instructor", SEED + 10), ("reviewer", SEED + 11)):
        d = tmp_path / name
        save_pretrained(_lm(tok, seed), d)
        tok.save_pretrained(d)
        dirs.append(d)
    return dirs


def _policy_yaml(tmp_path, roles_yaml: str, extra_env: str = "") -> tuple[PolicyConfig, dict]:
    text = textwrap.dedent(f"""
        policy:
          algo: ppo
          env: llm
          num_envs: 4
          num_steps: 3
          num_updates: 2
          hidden_sizes: [8]
          ppo: {{num_minibatches: 2}}
          seed: {SEED}
          env_config:
            max_len: {L}
            episode_length: 3
            max_seeds: 8
            operations: [{", ".join(ACTIONS)}]
            elimination: {{}}
            {extra_env}
        roles:
    """) + textwrap.indent(textwrap.dedent(roles_yaml), "  ")
    d = yaml.safe_load(text)
    return cfglib.from_dict(PolicyConfig, d["policy"], "policy"), d["roles"]


def test_policy_stage_llm_env_from_yaml_with_flax_roles_is_jitted(tmp_path, tok_and_seeds):
    """Mutations caught: the roles not reaching the env (the stage then fails: 'llm' needs an
    instructor), the flax path falling back to the host loop, the baselines run by default on
    the LLM env (they triple its instructor cost), queries charged for stopped steps."""
    tok, _ = tok_and_seeds
    ins, rev = _save_checkpoints(tmp_path, tok)
    cfg, roles = _policy_yaml(tmp_path, f"""
        instructor: {{backend: flax, checkpoint: {ins}, dtype: float32, max_new_tokens: {L}}}
        reviewer: {{backend: flax, checkpoint: {rev}, dtype: float32}}
    """)
    roles = cfglib.from_dict(RolesConfig, roles, "roles")
    logs = []
    summary = run_policy_stage(cfg, tmp_path / "run", roles=roles, log=logs.append)
    assert not any("host-step" in line for line in logs)
    assert summary["baselines"] == {}
    rows = [yaml.safe_load(line) for line in (tmp_path / "run" / "policy" / "curves.jsonl").read_text().splitlines()]
    for r in rows:
        stops = r["op_histogram"][STOP] * r["episode_length"]
        assert r["queries"]["instructor"] == pytest.approx(r["episode_length"] - stops, abs=1e-4)
        assert r["queries"]["reviewer"] == pytest.approx(r["queries"]["instructor"], abs=1e-4)


class FakeInstructor:
    """A Backend (the protocol) that rewrites by appending a clause; records every batch it gets."""

    def __init__(self, counter):
        self.role, self.model, self.counter, self.batches = "instructor", "fake", counter, []

    def complete(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, stop=None, seed=None):
        self.counter.add(self.role, len(prompts))
        self.batches.append(len(prompts))
        out = []
        for p in prompts:
            text = p[-1]["content"] if isinstance(p, list) else p
            old = text.split("Original instruction:\n", 1)[1].split("\n", 1)[0]
            out.append(Completion(old + CLAUSE, None, "stop"))
        return out

    def score(self, prompts, continuations):
        raise NotImplementedError


CLAUSE = " Rewrite it by adding one more constraint"  # words of the vocabulary (a word-level tokenizer)


class FakeReviewer:
    """Says "Not Equal" when the new instruction has one more of the instructor's clauses than the
    old one (an odd count in the comparison prompt), else "Equal" (a rejected rewrite)."""

    def __init__(self, counter):
        self.role, self.model, self.counter, self.calls = "reviewer", "fake", counter, 0

    def complete(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, stop=None, seed=None):
        self.counter.add(self.role, len(prompts))
        self.calls += 1
        out = []
        for p in prompts:
            odd = p[-1]["content"].count(CLAUSE.strip()) % 2 == 1
            out.append(Completion("Not Equal" if odd else "Equal"))
        return out

    def score(self, prompts, continuations):
        raise NotImplementedError


def test_policy_stage_with_http_roles_uses_the_host_step_loop(tmp_path, tok_and_seeds):
    """Mutations caught: remote roles compiled into the scan (io_callback rows of finished or
    stopped episodes sent, so more queries than the curves report), the reviewer's text reply not
    parsed into the reward, the instructor's text not re-tokenized into the buffer."""
    tok, _ = tok_and_seeds
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    counter = QueryCounter()
    instructor, reviewer = FakeInstructor(counter), FakeReviewer(counter)
    cfg, _ = _policy_yaml(tmp_path, "{}", extra_env=f"tokenizer: {tok_dir}")
    cfg = cfg.replace(env_config=dataclasses.replace(cfg.env_config, reward_weights={"reviewer": 1.0}))
    logs = []
    run_policy_stage(cfg, tmp_path / "run", roles={"instructor": instructor, "reviewer": reviewer}, log=logs.append)
    assert any("host-step" in line for line in logs)
    rows = [yaml.safe_load(line) for line in (tmp_path / "run" / "policy" / "curves.jsonl").read_text().splitlines()]
    sent = counter.snapshot()
    total = {role: sum(r["queries"][role] * cfg.num_envs for r in rows) for role in ("instructor", "reviewer")}
    assert sent["instructor"] == pytest.approx(total["instructor"]) and sent["instructor"] > 0
    assert sent["reviewer"] == pytest.approx(total["reviewer"])
    assert max(instructor.batches) <= cfg.num_envs  # one call per env step for all live rows
    # Every kept rewrite is longer, so the text judge says "Not Equal" (1.0) on every taken step.
    for r in rows:
        assert r["return"] == pytest.approx(r["queries"]["reviewer"], abs=1e-4)


def test_instruction_buffer_is_the_instructors_rewrite_limit(tmp_path, tok_and_seeds):
    """One setting per role (issue 18): the LLM env's buffer is ``roles.instructor.max_new_tokens`` in
    the policy stage and in the generate stage's observation env; ``max_len`` set to another value
    is a ConfigError naming both keys. Mutations caught: the buffer left at the token-edit default
    (128) while the instructor may write 40, and the observation env rebuilt at another width."""
    from teams_rl_jax.env.factory import observation_env
    from teams_rl_jax.errors import ConfigError

    tok, _ = tok_and_seeds
    ins, _ = _save_checkpoints(tmp_path, tok)
    roles = cfglib.from_dict(RolesConfig, {"instructor": {"backend": "flax", "checkpoint": str(ins),
                                                          "dtype": "float32", "max_new_tokens": 40}}, "roles")
    cfg = {"episode_length": 2, "max_seeds": 4, "elimination": {}}
    env, params = make("llm", cfg, roles=roles)
    assert params.max_len == 40 and env.operator.max_new_tokens == 40
    _, obs_params = observation_env("llm", cfg, roles)
    assert obs_params.max_len == 40
    with pytest.raises(ConfigError, match=r"max_len: 64 differs from roles.instructor.max_new_tokens 40"):
        make("llm", {**cfg, "max_len": 64}, roles=roles)
    assert make("llm", {**cfg, "max_len": 40}, roles=roles)[1].max_len == 40
