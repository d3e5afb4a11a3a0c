"""The functional instruction-evolution env (gymnax style) and ``make``.

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

Observation (``float32 [D + A + 1]``): the instruction embedding, one-hot previous action (zeros at
the first step), step fraction ``t / episode_length``.

``info``: ``queries`` ({role: float32}; ``instructor`` and ``reviewer`` always present, token edits
cost 0, LLM operator calls 1 instructor query, a reward term with a role its ``cost``),
``terminated``, ``truncated``, ``reward_terms`` (raw, unweighted), ``penalty``, ``eliminated``
({rule: bool}), ``length`` (instruction tokens after the step).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.struct as struct
import jax
import jax.numpy as jnp

from teams_rl_jax.config import from_dict
from teams_rl_jax.env.buffers import Instruction, distinct_count
from teams_rl_jax.env.config import EnvConfig
from teams_rl_jax.env.elimination import VocabTables, build_vocab_tables, eliminated_tokens
from teams_rl_jax.env.embedding import EMBEDDINGS
from teams_rl_jax.env.rewards import REWARD_TERMS, RewardTerm, register_term
from teams_rl_jax.env.seeds import SeedBatch, decode, offline_tokenizer, read_seed_records, seeds_from_texts
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


def _batch1(tree):
    return jax.tree.map(lambda x: x[None], tree)


@dataclasses.dataclass(frozen=True, eq=False)
class EvolveEnv:
    """Instruction-evolution env. Build with :func:`make`.

    ``operator``: ``apply(key, op_ids, tokens, lengths, params[, context]) -> (tokens, lengths,
    queries)`` on batches; ``embed_fn(params, tokens [L], length) -> [D]``; ``terms`` and ``rules``
    as registered in ``env.rewards`` / ``env.elimination``.
    """

    operator: Any
    operations: tuple[str, ...]
    terms: tuple[RewardTerm, ...]
    rule_names: tuple[str, ...]
    embed_fn: Callable[[Any, jax.Array, jax.Array], jax.Array]
    tokenizer: Any = None
    config: EnvConfig | None = None

    @property
    def num_actions(self) -> int:
        """Number of operations (6 by default)."""
        return len(self.operations)

    @property
    def term_names(self) -> tuple[str, ...]:
        """Reward term names, in ``params.weights`` order."""
        return tuple(t.name for t in self.terms)

    @property
    def roles(self) -> tuple[str, ...]:
        """Query roles reported in ``info["queries"]``."""
        return tuple(dict.fromkeys(ROLES + tuple(t.role for t in self.terms if t.role)))

    def embedding_size(self, params: EnvParams) -> int:
        """Embedding width ``D`` (by shape evaluation, so any ``embed_fn`` works)."""
        out = jax.eval_shape(self.embed_fn, params.embed, jax.ShapeDtypeStruct((params.max_len,), jnp.int32),
                             jax.ShapeDtypeStruct((), jnp.int32))
        return int(out.shape[-1])

    def observation_size(self, params: EnvParams) -> int:
        """``D + num_actions + 1``."""
        return self.embedding_size(params) + self.num_actions + 1

    def describe(self, params: EnvParams, tokens: jax.Array, length: jax.Array) -> Instruction:
        """Buffer + features (embedding, distinct-token count) of one instruction."""
        length = jnp.asarray(length, jnp.int32)
        emb = self.embed_fn(params.embed, tokens, length).astype(jnp.float32)
        return Instruction(tokens=tokens.astype(jnp.int32), length=length, embedding=emb,
                           distinct=distinct_count(tokens, length))

    def observation(self, state: EnvState, params: EnvParams) -> jax.Array:
        """``float32 [D + A + 1]``: embedding, one-hot previous action, step fraction."""
        prev = jax.nn.one_hot(state.prev_action, self.num_actions) * (state.prev_action >= 0)
        frac = jnp.reshape(state.t / params.episode_length, (1,))
        return jnp.concatenate([state.instruction.embedding, prev, frac]).astype(jnp.float32)

    def reset(self, key: jax.Array, params: EnvParams, seeds: SeedBatch | None = None):
        """Start an episode from a seed drawn uniformly by ``key`` (``seeds`` defaults to ``params.seeds``)."""
        pool = params.seeds if seeds is None else seeds
        return self.reset_to(jax.random.randint(key, (), 0, pool.tokens.shape[0]), params, seeds)

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
        return self.observation(state, params), state

    def step(self, key: jax.Array, state: EnvState, action: jax.Array, params: EnvParams):
        """Apply operation ``action``; returns ``(obs, state, reward, done, info)``."""
        action = jnp.asarray(action, jnp.int32)
        k_op, k_terms = jax.random.split(key)
        before = state.instruction
        extra = {}
        if getattr(self.operator, "wants_context", False):
            extra["context"] = {"domain": state.domain[None], "seed": state.seed[None]}
        new_tokens, new_len, op_queries = self.operator.apply(
            k_op, action[None], before.tokens[None], before.length[None], params.operator, **extra)
        after = self.describe(params, materialize(new_tokens[0]), new_len[0])

        queries = {role: jnp.zeros((), jnp.float32) for role in self.roles}
        queries["instructor"] = jnp.asarray(op_queries[0], jnp.float32)
        terms: dict[str, jax.Array] = {}
        aux = {"op": action[None], "step": state.t[None], "terms": {}}
        b1, a1 = _batch1(before), _batch1(after)
        for term, k in zip(self.terms, jax.random.split(k_terms, max(len(self.terms), 1))):
            aux["params"] = params.term_params.get(term.name)
            value = jnp.asarray(term.fn(k, b1, a1, aux), jnp.float32).reshape(-1)[0]
            terms[term.name] = value
            aux["terms"] = {**aux["terms"], term.name: value[None]}
            if term.role:
                queries[term.role] = queries[term.role] + term.cost

        # The reviewer-role term is the judge: its P(Not Equal) < 0.5 means "Equal" (no_gain rule).
        judge = next((terms[t.name] for t in self.terms if t.role == "reviewer"), None)
        rule_aux = {"terms": terms} if judge is None else {"terms": terms, "judge": judge}
        flags = eliminated_tokens(before, after, params.tables, self.rule_names, rule_aux)
        hit = jnp.stack([flags[r] for r in self.rule_names]) if self.rule_names else jnp.zeros((0,), bool)
        eliminated = hit.any()
        penalty = jnp.sum(params.penalties * hit)
        gain = sum((params.weights[i] * terms[n] for i, n in enumerate(self.term_names)), jnp.zeros((), jnp.float32))
        revert = eliminated & params.revert_eliminated
        gain = jnp.where(revert, 0.0, gain)
        after = jax.tree.map(lambda b, a: jnp.where(revert, b, a), before, after)
        reward = gain - penalty

        t = state.t + 1
        terminated = eliminated & params.terminate_on_elimination
        truncated = (t >= params.episode_length) & ~terminated
        done = terminated | truncated
        new_state = EnvState(instruction=after, seed=state.seed, domain=state.domain, prev_action=action, t=t,
                             done=done)
        # A finished episode stays as it is (no auto-reset): nothing changes, nothing is earned or spent.
        was_done = state.done
        new_state = jax.tree.map(lambda old, new: jnp.where(was_done, old, new), state, new_state)
        live = ~was_done
        info = {
            "queries": {r: q * live for r, q in queries.items()},
            "terminated": terminated & live,
            "truncated": truncated & live,
            "reward_terms": {n: v * live for n, v in terms.items()},
            "penalty": penalty * live,
            "eliminated": {r: f & live for r, f in flags.items()},
            "length": new_state.instruction.length,
        }
        reward = jnp.where(was_done, 0.0, reward).astype(jnp.float32)
        return self.observation(new_state, params), new_state, reward, new_state.done, info

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
    return from_dict(EnvConfig, data, "env")


def _load_tokenizer(cfg: EnvConfig, tokenizer, seed_texts: Sequence[str]):
    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    path = tokenizer if isinstance(tokenizer, str) else cfg.tokenizer
    if path is not None:
        from teams_rl_jax.data.tokenizer import load_tokenizer

        return load_tokenizer(path)
    return offline_tokenizer(seed_texts, cfg.vocab_size)


def make(name: str | None = "token_edit", config: EnvConfig | dict | None = None, *, tokenizer=None,
         seeds: SeedBatch | Sequence[str] | None = None, domains: Sequence[str | None] | None = None,
         operator=None, operator_params=None, embed_fn=None, embed_params=None,
         reward_terms: Sequence[RewardTerm] = (), term_params: dict | None = None,
         **overrides) -> tuple[EvolveEnv, EnvParams]:
    """Build ``(env, env_params)`` for ``name`` (``"token_edit"`` or ``"llm"``).

    ``config`` (an :class:`EnvConfig` or dict) plus keyword overrides of its fields (the policy
    stage's ``env_kwargs``) set everything by name. Python objects plug in directly:

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
        from teams_rl_jax.env.token_edit import build_token_edit

        operator, operator_params = build_token_edit(tok, cfg.operations, pool, cfg.max_len)
    elif getattr(operator, "max_len", cfg.max_len) != cfg.max_len:
        raise ConfigError(f"operator.max_len {operator.max_len} != env max_len {cfg.max_len}")

    if embed_fn is None:
        spec = EMBEDDINGS.get(cfg.embedding)
        embed_fn = spec.apply
        if embed_params is None:
            embed_params = spec.init(jax.random.PRNGKey(cfg.embed_seed), cfg.embed_buckets, cfg.embed_dim)

    terms = tuple(REWARD_TERMS.get(n) for n in cfg.reward_weights)
    tp = {t.name: t.init(cfg) for t in terms if t.init is not None}
    tp.update(term_params or {})
    rules = tuple(cfg.elimination)
    params = EnvParams(
        seeds=pool, operator=operator_params, embed=embed_params,
        tables=build_vocab_tables(tok, cfg.sorry_max_words),
        weights=jnp.asarray([cfg.reward_weights[t.name] for t in terms], jnp.float32),
        penalties=jnp.asarray([cfg.elimination[r] for r in rules], jnp.float32),
        term_params=tp, revert_eliminated=jnp.asarray(cfg.revert_eliminated),
        terminate_on_elimination=jnp.asarray(cfg.terminate_on_elimination),
        episode_length=cfg.episode_length, max_len=cfg.max_len)
    env = EvolveEnv(operator=operator, operations=tuple(cfg.operations), terms=terms, rule_names=rules,
                    embed_fn=embed_fn, tokenizer=tok, config=cfg)
    return env, params
