"""The functional instruction-evolution env (gymnax style) and ``build_env`` (``env.factory.make`` calls it).

``obs, state = env.reset(key, params, seeds=None)``;
``obs, state, reward, done, info = env.step(key, state, action, params)``. One environment per call,
pure and jit-able; batch with ``jax.vmap`` over keys/states/actions (params and seeds unbatched) and
roll out with ``lax.scan``. There is no auto-reset: after ``done`` a step changes nothing, rewards 0
and costs no queries (the policy stage runs episode-aligned rollouts and masks those steps).

A step: the operator rewrites the instruction buffer (``action`` = index into
``EnvConfig.operations``); the new buffer is embedded; reward terms score (before, after); the
elimination rules check the result; an eliminated evolution is dropped (``revert_eliminated``) and
penalised. ``truncated`` = out of steps (``episode_length``), ``terminated`` = ended early (an
elimination with ``terminate_on_elimination``); ``done = terminated | truncated``.

Observation (``EnvConfig.observation``): ``"embedding"`` (``float32 [D + A + 1]``): the instruction
embedding, one-hot previous action (zeros at the first step), step fraction ``t / episode_length``;
``"paper"`` (``float32 [6]``): the reference's one-hot of the last operation in its index order
(``operations.REFERENCE_ORDER``), zeros at reset (and after ``stop``). The reference also normalises it
with a running mean/std (ZFilter, clip 5) in its training loop; we feed the raw one-hot.

Reward (``EnvConfig.reward``): ``"shaped"``: the weighted terms minus the elimination penalties;
``"reviewer_binary"`` / ``"reviewer_soft"``: the reviewer term alone (the text reviewer's parsed verdict /
the jitted judge's P(Not Equal)), minus penalties only where ``elimination_penalties`` is set.

``info``: ``queries`` ({role: float32}; ``instructor`` and ``reviewer`` always present, token edits
cost 0, LLM operator calls 1 instructor query, a reward term with a role its ``cost``),
``terminated``, ``truncated`` (the episode ran out of steps), ``reward_terms`` (raw, unweighted),
``penalty``, ``eliminated`` ({reason: bool}: every configured rule, and with an LLM operator always
``truncated``: the instructor's rewrite was cut by its ``max_new_tokens`` or did not fit the buffer, so
the old instruction was kept), ``length`` (instruction tokens after the step), ``paper_cost`` (the reference's cost: 1 per
operation applied, 0 for ``stop``; its ``info["cost"]`` is the negation).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.struct as struct
import jax
import jax.numpy as jnp

from teams_rl_jax.config import from_dict
from teams_rl_jax.data.tokenizer import load_tokenizer
from teams_rl_jax.env.buffers import Instruction, distinct_count
from teams_rl_jax.env.config import TOKEN_EDIT_MAX_LEN, EnvConfig
from teams_rl_jax.env.elimination import VocabTables, build_vocab_tables, eliminated_tokens
from teams_rl_jax.env.embedding import EMBEDDINGS
from teams_rl_jax.env.judge import check_role_tokenizers
from teams_rl_jax.env.operations import REFERENCE_ORDER, STOP
from teams_rl_jax.env.rewards import REVIEWER_REWARDS, REWARD_TERMS, RewardTerm, register_term
from teams_rl_jax.env.seeds import SeedBatch, decode, offline_tokenizer, read_seed_records, seeds_from_texts
from teams_rl_jax.env.spaces import Box, Discrete
from teams_rl_jax.env.token_edit import build_token_edit
from teams_rl_jax.errors import ConfigError

ROLES = ("instructor", "reviewer")


@struct.dataclass
class EnvParams:
    """Traced env parameters; ``episode_length`` and ``max_len`` are static (they fix shapes/loops).

    ``seeds``: default reset pool (and, for the token-edit operator, the breadth pool);
    ``operator``: the operator's params; ``embed``: the embedding's params; ``tables``: vocabulary
    tables of the elimination rules; ``weights [T]``/``penalties [R]``: in ``env.term_names`` /
    ``env.rule_names`` order; ``term_params``: {term: pytree}; the two elimination switches of
    ``EnvConfig``. All traced: ``params.replace(...)`` changes them without recompiling.
    """

    seeds: SeedBatch
    operator: Any
    embed: Any
    tables: VocabTables
    weights: jax.Array
    penalties: jax.Array
    term_params: dict
    revert_eliminated: jax.Array  # bool []
    terminate_on_elimination: jax.Array  # bool []
    episode_length: int = struct.field(pytree_node=False, default=6)
    max_len: int = struct.field(pytree_node=False, default=128)
    # Whether buffer lengths are the instructor's own token counts (its tokenizer fills the buffers);
    # False for the byte-level text encoding of HTTP roles: a seed's served length is then unknown.
    buffer_is_served: bool = struct.field(pytree_node=False, default=True)


@struct.dataclass
class EnvState:
    """Per-env state: current instruction (with features), its seed (-1 = not from ``params.seeds``)
    and domain, previous action (-1 before the first), step, done flag."""

    instruction: Instruction
    seed: jax.Array
    domain: jax.Array
    prev_action: jax.Array
    t: jax.Array
    done: jax.Array


def materialize(x: jax.Array) -> jax.Array:
    """``x``, computed once into memory.

    XLA:CPU otherwise fuses an edited buffer's producers (gathers, selects) into each consumer and
    recomputes them per element there: the n-gram searches read every token once per pattern, which
    made a step ~5x slower. ``optimization_barrier`` is removed before fusion on CPU; a scatter is
    never fused into its consumers, so an identity scatter pins the buffer.
    """
    idx = jnp.arange(x.shape[-1])
    return jnp.zeros_like(x).at[..., idx].set(x, unique_indices=True, indices_are_sorted=True)


def reference_one_hot(prev_action: jax.Array, operations: Sequence[str]) -> jax.Array:
    """``observation: paper``: ``float32 [..., 6]`` one-hot of the operation ``prev_action`` (an index
    into ``operations``) in the reference's order (``REFERENCE_ORDER``); zeros for -1 (reset), ``stop``
    and operations the reference does not have. The generate stage can call it with the policy's own
    action list."""
    table = jnp.asarray([REFERENCE_ORDER.index(op) if op in REFERENCE_ORDER else -1 for op in operations], jnp.int32)
    prev = jnp.asarray(prev_action, jnp.int32)
    idx = jnp.where(prev >= 0, table[jnp.maximum(prev, 0)], -1)
    return (jax.nn.one_hot(idx, len(REFERENCE_ORDER)) * (idx >= 0)[..., None]).astype(jnp.float32)


def _batch1(tree):
    return jax.tree.map(lambda x: x[None], tree)


def _rows(mask: jax.Array, like: jax.Array) -> jax.Array:
    """``mask [N]`` broadcast against a ``[N, ...]`` array."""
    return mask.reshape(mask.shape + (1,) * (like.ndim - mask.ndim))


@dataclasses.dataclass(frozen=True, eq=False)
class EvolveEnv:
    """Instruction-evolution env (gymnax's split). Build with :func:`make`.

    ``operator``: ``apply(key, op_ids, tokens, lengths, params[, context][, active]) -> (tokens,
    lengths, queries[, served])`` on batches (``served``: lengths in the served model's tokens, -1 =
    unknown; text operators report them from the endpoint's usage), indexed by the env's operations *without* ``stop`` (in order);
    ``embed_fn(params, tokens [L], length) -> [D]``; ``terms`` and ``rules`` as registered in
    ``env.rewards`` / ``env.elimination``. ``params`` (set by :func:`make`) is ``default_params``.

    The batched step (:meth:`step_batch`) is the core: the operator rewrites all ``N`` rows in one
    call (the LLM operator: one left-padded batched generate, not ``N`` batch-1 generates under
    ``vmap``), reward terms score ``[N]`` rows at once. :meth:`step_env` is its one-row case.
    """

    operator: Any
    operations: tuple[str, ...]
    terms: tuple[RewardTerm, ...]
    rule_names: tuple[str, ...]
    embed_fn: Callable[[Any, jax.Array, jax.Array], jax.Array]
    tokenizer: Any = None
    config: EnvConfig | None = None
    params: EnvParams | None = None
    # Queries each taken (non-stop) step is charged per role on top of what the operator and the
    # reward terms report: a token-edit env standing in for an LLM env's query budget.
    simulated_queries: tuple[tuple[str, float], ...] = ()
    # Roles served over HTTP (host callbacks inside the step): the policy stage steps such an env
    # from Python instead of compiling it into a rollout scan.
    host_roles: tuple[str, ...] = ()

    @property
    def num_actions(self) -> int:
        """Number of operations (6 by default; 7 with ``stop``)."""
        return len(self.operations)

    @property
    def stop_action(self) -> int:
        """Action id of ``stop`` (-1 when the env has none)."""
        return self.operations.index(STOP) if STOP in self.operations else -1

    @property
    def operator_operations(self) -> tuple[str, ...]:
        """The operations the operator carries out (``operations`` without ``stop``), its op-id order."""
        return tuple(op for op in self.operations if op != STOP)

    @property
    def default_params(self) -> EnvParams:
        """The params :func:`make` built (gymnax's ``default_params``)."""
        if self.params is None:
            raise ConfigError("this env has no default params; build it with teams_rl_jax.env.make")
        return self.params

    def action_space(self, params: EnvParams | None = None) -> Discrete:
        """``Discrete(num_actions)``."""
        return Discrete(self.num_actions)

    def observation_space(self, params: EnvParams | None = None) -> Box:
        """Unbounded ``Box`` of shape ``(observation_size,)``."""
        return Box(-float("inf"), float("inf"), (self.observation_size(params or self.default_params),))

    @property
    def term_names(self) -> tuple[str, ...]:
        """Reward term names, in ``params.weights`` order."""
        return tuple(t.name for t in self.terms)

    @property
    def roles(self) -> tuple[str, ...]:
        """Query roles reported in ``info["queries"]``."""
        return tuple(dict.fromkeys(ROLES + tuple(t.role for t in self.terms if t.role)
                                   + tuple(r for r, _ in self.simulated_queries)))

    def role_stats(self) -> dict[str, dict]:
        """Host-side counts of the text roles, by role (``env.host_roles``): the instructor's ``calls``,
        ``rows``, ``rejected``; the reviewer's ``calls``, ``rows``, ``unparseable``. Empty for jitted roles."""
        out = {}
        if isinstance(getattr(self.operator, "stats", None), dict):
            out["instructor"] = dict(self.operator.stats)
        for t in self.terms:
            if t.role and isinstance(getattr(t.fn, "stats", None), dict):
                out[t.role] = dict(t.fn.stats)
        return out

    def embedding_size(self, params: EnvParams) -> int:
        """Embedding width ``D`` (by shape evaluation, so any ``embed_fn`` works)."""
        out = jax.eval_shape(self.embed_fn, params.embed, jax.ShapeDtypeStruct((params.max_len,), jnp.int32),
                             jax.ShapeDtypeStruct((), jnp.int32))
        return int(out.shape[-1])

    @property
    def observation_kind(self) -> str:
        """``EnvConfig.observation`` (``"embedding"`` without a config)."""
        return getattr(self.config, "observation", "embedding")

    def observation_size(self, params: EnvParams | None = None) -> int:
        """``D + num_actions + 1`` (``"embedding"``), 6 (``"paper"``)."""
        if self.observation_kind == "paper":
            return len(REFERENCE_ORDER)
        return self.embedding_size(params or self.default_params) + self.num_actions + 1

    def describe(self, params: EnvParams, tokens: jax.Array, length: jax.Array, served=None) -> Instruction:
        """Buffer + features (embedding, distinct-token count) of one instruction; ``served`` (its
        length in the served model's tokens, -1 = unknown) defaults to ``length`` where
        ``params.buffer_is_served``, else to -1."""
        length = jnp.asarray(length, jnp.int32)
        emb = self.embed_fn(params.embed, tokens, length).astype(jnp.float32)
        default = length if params.buffer_is_served else jnp.full_like(length, -1)
        served = default if served is None else jnp.where(jnp.asarray(served) >= 0, served, default)
        return Instruction(tokens=tokens.astype(jnp.int32), length=length, embedding=emb,
                           distinct=distinct_count(tokens, length), served=jnp.asarray(served, jnp.int32))

    def get_obs(self, state: EnvState, params: EnvParams | None = None) -> jax.Array:
        """``float32 [D + A + 1]``: embedding, one-hot previous action, step fraction (one env); with
        ``observation: paper`` the reference's ``float32 [6]`` one-hot of the last operation."""
        params = params or self.default_params
        if self.observation_kind == "paper":
            return reference_one_hot(state.prev_action, self.operations)
        prev = jax.nn.one_hot(state.prev_action, self.num_actions) * (state.prev_action >= 0)
        frac = jnp.reshape(state.t / params.episode_length, (1,))
        return jnp.concatenate([state.instruction.embedding, prev, frac]).astype(jnp.float32)

    observation = get_obs  # the name used before the gymnax split

    def is_terminal(self, state: EnvState, params: EnvParams | None = None) -> jax.Array:
        """Whether the episode is over."""
        return state.done

    def discount(self, state: EnvState, params: EnvParams | None = None) -> jax.Array:
        """gymnax's discount: 0 once the episode is over, else 1."""
        return jnp.where(state.done, 0.0, 1.0).astype(jnp.float32)

    def reset(self, key: jax.Array, params: EnvParams | None = None, seeds: SeedBatch | None = None):
        """gymnax ``reset``: :meth:`reset_env` with ``params`` defaulting to ``default_params``."""
        return self.reset_env(key, params or self.default_params, seeds)

    def reset_env(self, key: jax.Array, params: EnvParams, seeds: SeedBatch | None = None):
        """Start an episode from a seed drawn uniformly by ``key`` (``seeds`` defaults to ``params.seeds``)."""
        pool = params.seeds if seeds is None else seeds
        return self.reset_to(jax.random.randint(key, (), 0, pool.tokens.shape[0]), params, seeds)

    def reset_batch(self, keys: jax.Array, params: EnvParams, seeds: SeedBatch | None = None):
        """:meth:`reset_env` for each of ``keys [N]`` (batched obs and states)."""
        return jax.vmap(self.reset_env, in_axes=(0, None, None))(keys, params, seeds)

    def reset_to(self, index: jax.Array, params: EnvParams, seeds: SeedBatch | None = None):
        """Start an episode from seed ``index`` of ``seeds`` (default ``params.seeds``); no randomness."""
        pool = params.seeds if seeds is None else seeds
        width = pool.tokens.shape[-1]
        if width > params.max_len:
            raise ConfigError(f"seed buffers are {width} tokens wide, more than max_len {params.max_len}")
        idx = jnp.asarray(index, jnp.int32)
        tokens = jnp.pad(pool.tokens[idx], (0, params.max_len - width))
        state = EnvState(
            instruction=self.describe(params, tokens, pool.lengths[idx]),
            seed=idx if seeds is None else jnp.asarray(-1, jnp.int32),  # breadth skips its own seed
            domain=pool.domains[idx].astype(jnp.int32),
            prev_action=jnp.asarray(-1, jnp.int32),
            t=jnp.asarray(0, jnp.int32),
            done=jnp.asarray(False),
        )
        return self.get_obs(state, params), state

    def step(self, key: jax.Array, state: EnvState, action: jax.Array, params: EnvParams | None = None):
        """gymnax ``step``: :meth:`step_env` with ``params`` defaulting to ``default_params``.

        No auto-reset: the policy stage runs episode-aligned rollouts, and a finished episode stays
        as it is (nothing changes, nothing is earned or spent) until the next ``reset``.
        """
        return self.step_env(key, state, action, params or self.default_params)

    def step_env(self, key: jax.Array, state: EnvState, action: jax.Array, params: EnvParams):
        """Apply operation ``action`` to one env; returns ``(obs, state, reward, done, info)``."""
        out = self.step_batch(key, _batch1(state), jnp.asarray(action, jnp.int32)[None], params)
        return jax.tree.map(lambda x: x[0], out)

    def step_batch(self, key: jax.Array, state: EnvState, action: jax.Array, params: EnvParams):
        """Apply ``action [N]`` to ``N`` envs at once (one operator call on ``[N]`` rows).

        Returns ``(obs [N, O], state, reward [N], done [N], info)`` with per-row info values.
        ``stop`` (if among the actions) ends the episode at once, keeps the instruction, earns 0
        and costs 0 queries; so does any action on an episode that is already over.
        """
        action = jnp.asarray(action, jnp.int32)
        n = action.shape[0]
        k_op, k_terms = jax.random.split(key)
        before = state.instruction
        was_done = state.done
        is_stop = (action == self.stop_action) if self.stop_action >= 0 else jnp.zeros((n,), bool)
        active = ~was_done & ~is_stop  # rows whose instruction is really rewritten (and paid for)
        op_map = jnp.asarray([self.operator_operations.index(op) if op != STOP else 0 for op in self.operations],
                             jnp.int32)
        extra = {}
        if getattr(self.operator, "wants_context", False):
            extra["context"] = {"domain": state.domain, "seed": state.seed}
        if getattr(self.operator, "wants_active", False):
            extra["active"] = active
        if getattr(self.operator, "reports_truncated", False):
            extra["with_truncated"] = True
        out = self.operator.apply(k_op, op_map[action], before.tokens, before.length, params.operator, **extra)
        new_tokens, new_len, op_queries = out[:3]
        served = out[3] if len(out) > 3 else jnp.full_like(new_len, -1)  # text operators: usage counts
        # LLM operators: the rewrite was cut (max_new_tokens or the buffer) and the old instruction kept.
        cut = jnp.asarray(out[4], bool).reshape(n) if len(out) > 4 else jnp.zeros((n,), bool)
        after = jax.vmap(self.describe, in_axes=(None, 0, 0, 0))(params, materialize(new_tokens), new_len, served)
        after = jax.tree.map(lambda b, a: jnp.where(_rows(active, b), a, b), before, after)

        queries = {role: jnp.zeros((n,), jnp.float32) for role in self.roles}
        queries["instructor"] = jnp.asarray(op_queries, jnp.float32).reshape(n)
        for role, q in self.simulated_queries:
            queries[role] = queries[role] + q
        terms: dict[str, jax.Array] = {}
        aux = {"op": action, "step": state.t, "terms": {}, "active": active}
        for term, k in zip(self.terms, jax.random.split(k_terms, max(len(self.terms), 1))):
            aux["params"] = params.term_params.get(term.name)
            value = jnp.asarray(term.fn(k, before, after, aux), jnp.float32).reshape(n)
            terms[term.name] = value
            aux["terms"] = {**aux["terms"], term.name: value}
            if term.role:
                queries[term.role] = queries[term.role] + term.cost

        # The reviewer-role term is the judge: its P(Not Equal) < 0.5 means "Equal" (no_gain rule).
        judge = next((terms[t.name] for t in self.terms if t.role == "reviewer"), None)
        rule_aux = {"terms": terms, "truncated": cut}
        if judge is not None:
            rule_aux["judge"] = judge
        flags = jax.vmap(lambda b, a, x: eliminated_tokens(b, a, params.tables, self.rule_names, x))(
            before, after, rule_aux)
        flags = {r: f & active for r, f in flags.items()}
        reasons = dict(flags)
        if len(out) > 4:  # an LLM operator: its cut rewrites are reported even where the rule is not configured
            reasons["truncated"] = cut & active
        hit = (jnp.stack([flags[r] for r in self.rule_names], axis=-1) if self.rule_names
               else jnp.zeros((n, 0), bool))
        eliminated = hit.any(-1)
        penalty = jnp.sum(params.penalties * hit, axis=-1)
        gain = sum((params.weights[i] * terms[name] for i, name in enumerate(self.term_names)),
                   jnp.zeros((n,), jnp.float32))
        revert = eliminated & params.revert_eliminated
        gain = jnp.where(revert, 0.0, gain)
        after = jax.tree.map(lambda b, a: jnp.where(_rows(revert, b), b, a), before, after)
        reward = gain - penalty

        t = state.t + 1
        terminated = (eliminated & params.terminate_on_elimination) | is_stop
        truncated = (t >= params.episode_length) & ~terminated
        done = terminated | truncated
        new_state = EnvState(instruction=after, seed=state.seed, domain=state.domain, prev_action=action, t=t,
                             done=done)
        # A finished episode stays as it is (no auto-reset): nothing changes, nothing is earned or spent.
        new_state = jax.tree.map(lambda old, new: jnp.where(_rows(was_done, old), old, new), state, new_state)
        live = ~was_done
        info = {
            "queries": {r: q * active for r, q in queries.items()},
            "terminated": terminated & live,
            "truncated": truncated & live,
            "reward_terms": {name: v * active for name, v in terms.items()},
            "penalty": penalty * active,
            "eliminated": reasons,
            "paper_cost": active.astype(jnp.float32),
            "length": new_state.instruction.length,
            "discount": jnp.where(new_state.done, 0.0, 1.0).astype(jnp.float32),
        }
        reward = jnp.where(active, reward, 0.0).astype(jnp.float32)
        obs = jax.vmap(self.get_obs, in_axes=(0, None))(new_state, params)
        return obs, new_state, reward, new_state.done, info

    def decode(self, tokens, lengths, tokenizer=None):
        """Text of instruction buffers (``[L]``/scalar or ``[N, L]``/``[N]``) with the env's tokenizer."""
        tok = tokenizer or self.tokenizer
        if tok is None:
            raise ConfigError("decode: this env has no tokenizer; pass tokenizer=")
        return decode(tok, tokens, lengths)

    def decode_state(self, state: EnvState, tokenizer=None):
        """Text of the instruction(s) held by ``state`` (single or batched)."""
        return self.decode(state.instruction.tokens, state.instruction.length, tokenizer)


def _resolve_config(config: EnvConfig | dict | None, name: str | None, overrides: dict) -> EnvConfig:
    if isinstance(config, EnvConfig):
        data = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    else:
        data = dict(config or {})
    data.update(overrides)
    if name is not None:
        data["operator"] = name
    if data.get("max_len") is None:  # the LLM env's comes from its instructor (env.factory); here: a default
        data["max_len"] = TOKEN_EDIT_MAX_LEN
    return from_dict(EnvConfig, data, "env")


def _load_tokenizer(cfg: EnvConfig, tokenizer, seed_texts: Sequence[str]):
    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    path = tokenizer if isinstance(tokenizer, str) else cfg.tokenizer
    if path is not None:
        return load_tokenizer(path)
    return offline_tokenizer(seed_texts, cfg.vocab_size)


def _reward_terms(cfg: EnvConfig, given: Sequence[RewardTerm]) -> tuple[tuple[RewardTerm, ...], list[float]]:
    """``(terms, weights)`` of ``cfg.reward``: ``shaped``: the terms named in ``reward_weights``, weighted;
    ``reviewer_binary`` / ``reviewer_soft``: the one reviewer term (of the ``verdict`` it needs), weight 1."""
    if cfg.reward == "shaped":
        return tuple(REWARD_TERMS.get(n) for n in cfg.reward_weights), [cfg.reward_weights[n] for n in cfg.reward_weights]
    named = [REWARD_TERMS.get(n) for n in cfg.reward_weights if n in REWARD_TERMS]
    reviewers = list({t.name: t for t in [*given, *named] if t.role == "reviewer"}.values())
    if len(reviewers) != 1:
        raise ConfigError(f"reward: {cfg.reward} needs one reviewer (roles.reviewer), got {len(reviewers)}")
    want = REVIEWER_REWARDS[cfg.reward]
    if reviewers[0].verdict != want:
        raise ConfigError(f"reward: {cfg.reward} needs a reviewer whose verdict is {want!r}, "
                          f"got {reviewers[0].verdict!r} (term {reviewers[0].name!r})")
    return (reviewers[0],), [1.0]


def build_env(name: str | None = "token_edit", config: EnvConfig | dict | None = None, *, tokenizer=None,
              seeds: SeedBatch | Sequence[str] | None = None, domains: Sequence[str | None] | None = None,
              operator=None, operator_params=None, embed_fn=None, embed_params=None,
              reward_terms: Sequence[RewardTerm] = (), term_params: dict | None = None,
              buffer_is_served: bool = True, **overrides) -> tuple[EvolveEnv, EnvParams]:
    """Assemble ``(env, env_params)`` for ``name`` (``"token_edit"`` or ``"llm"``) from objects; the
    one factory, ``env.factory.make``, calls it (and builds the LLM roles first).

    ``config`` (an :class:`EnvConfig` or dict) plus keyword overrides of its fields set everything
    by name. Python objects plug in directly:

    * ``tokenizer``: a Hugging Face tokenizer or a local dir (default: ``config.tokenizer``, else the
      offline word-level tokenizer built from the seeds and phrase banks).
    * ``seeds``: a :class:`SeedBatch` or instruction strings (+ ``domains``); default: the file
      ``config.seeds_path`` or the 48 packaged seeds.
    * ``operator`` + ``operator_params``: required for ``"llm"`` (e.g.
      ``LLMOperator.create(lm, tokenizer, prompts.operation_templates(OPERATIONS), max_len=...)``);
      any object with the operator interface works for either name.
    * ``embed_fn`` + ``embed_params``: replace the hashed embedding (e.g. a sentence encoder).
    * ``reward_terms`` + ``term_params``: extra :class:`RewardTerm` objects (e.g. the reviewer judge;
      registered by name) and their params; weight them in ``reward_weights``.
    * ``buffer_is_served``: False when the buffers hold the byte-level text encoding of HTTP roles
      (lengths in the served model's tokens then come from the operator; ``EnvParams``).
    """
    for term in reward_terms:  # so that config.reward_weights may name them
        register_term(term)
    cfg = _resolve_config(config, name, overrides)
    if cfg.operator == "llm" and (operator is None or operator_params is None):
        raise ConfigError("env 'llm' needs an instructor operator: pass operator= and operator_params= "
                          "(teams_rl_jax.env.llm_operator.LLMOperator.create(lm, tokenizer, templates, max_len=...)); "
                          "use 'token_edit' for the LLM-free env")

    if isinstance(seeds, SeedBatch):
        seed_texts: list[str] = []
    elif seeds is not None:
        seed_texts = list(seeds)
    else:
        seed_texts, domains = read_seed_records(cfg.seeds_path, cfg.seed_field, cfg.max_seeds)
    tok = _load_tokenizer(cfg, tokenizer, seed_texts)
    if isinstance(seeds, SeedBatch):
        if seeds.tokens.shape[-1] > cfg.max_len:
            raise ConfigError(f"seeds are {seeds.tokens.shape[-1]} tokens wide, more than max_len {cfg.max_len}")
        pool = seeds.replace(tokens=jnp.pad(seeds.tokens, ((0, 0), (0, cfg.max_len - seeds.tokens.shape[-1]))))
    else:
        pool = seeds_from_texts(seed_texts, tok, cfg.max_len, domains, cfg.on_long_seed)

    if operator is None:
        operator, operator_params = build_token_edit(tok, [op for op in cfg.operations if op != STOP], pool,
                                                     cfg.max_len)
    elif getattr(operator, "max_len", cfg.max_len) != cfg.max_len:
        raise ConfigError(f"operator.max_len {operator.max_len} != env max_len {cfg.max_len}")

    if embed_fn is None:
        spec = EMBEDDINGS.get(cfg.embedding)
        embed_fn = spec.apply
        if embed_params is None:
            embed_params = spec.init(jax.random.PRNGKey(cfg.embed_seed), cfg.embed_buckets, cfg.embed_dim)

    terms, weights = _reward_terms(cfg, reward_terms)
    # The buffers hold the env tokenizer's ids and go to the instructor/reviewer as they are: a role
    # built with another tokenizer would read other words from the same ids, so refuse it here.
    check_role_tokenizers(tok, operator, terms)
    tp = {t.name: t.init(cfg) for t in terms if t.init is not None}
    tp.update(term_params or {})
    rules = tuple(cfg.elimination)
    params = EnvParams(
        seeds=pool, operator=operator_params, embed=embed_params,
        tables=build_vocab_tables(tok, cfg.sorry_max_words),
        weights=jnp.asarray(weights, jnp.float32),
        penalties=jnp.asarray([cfg.elimination[r] if cfg.elimination_penalties else 0.0 for r in rules], jnp.float32),
        term_params=tp, revert_eliminated=jnp.asarray(cfg.revert_eliminated),
        terminate_on_elimination=jnp.asarray(cfg.terminate_on_elimination),
        episode_length=cfg.episode_length, max_len=cfg.max_len, buffer_is_served=bool(buffer_is_served))
    env = EvolveEnv(operator=operator, operations=tuple(cfg.operations), terms=terms, rule_names=rules,
                    embed_fn=embed_fn, tokenizer=tok, config=cfg, params=params,
                    simulated_queries=tuple((r, float(q)) for r, q in cfg.simulated_queries.items()))
    return env, params
