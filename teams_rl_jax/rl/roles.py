"""The LLM env of the policy stage, built from the pipeline's ``roles`` (``policy.env: llm``).

``roles.instructor`` rewrites instructions, ``roles.reviewer`` judges each rewrite (reward
``P(Not Equal)``, WizardLM's equality check). Each role is a ``backends.config.RoleConfig`` (or an
already built :class:`~teams_rl_jax.backends.base.Backend`):

* every role in-process Flax (the backend has ``.lm`` and ``.tokenizer``): the instructor is the
  jitted :class:`~teams_rl_jax.env.llm_operator.LLMOperator` (one batched generate per env step) and
  the reviewer the jitted logit judge :func:`~teams_rl_jax.env.judge.reviewer_term`; the weights are
  traced env params, and the whole rollout can be one compiled scan;
* a role behind HTTP (``backend: openai``): :class:`HostOperator` / :func:`host_reviewer_term`
  decode the instruction buffers to text, call ``backend.complete`` once per env step for all live
  rows (stopped and finished episodes are not sent), and re-tokenize the answers; the reviewer's
  reply goes through the text judge :func:`~teams_rl_jax.env.judge.parse_judgement`. They run as
  ``jax.experimental.io_callback`` inside the jitted step, and the stage uses the host-step loop.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from teams_rl_jax.env.config import EnvConfig
from teams_rl_jax.env.operations import STOP
from teams_rl_jax.errors import BackendError, ConfigError

ROLE_NAMES = ("instructor", "reviewer")


def _role(roles: Any, name: str) -> Any:
    if roles is None:
        return None
    if isinstance(roles, Mapping):
        return roles.get(name)
    return getattr(roles, name, None)


def build_backend(spec: Any, role: str, counter=None):
    """A Backend for ``spec``: a built backend is used as is; a RoleConfig (or dict) is built."""
    if spec is None or callable(getattr(spec, "complete", None)):
        return spec
    from teams_rl_jax import backends
    from teams_rl_jax.backends.config import RoleConfig
    from teams_rl_jax.config import from_dict

    cfg = spec if isinstance(spec, RoleConfig) else from_dict(RoleConfig, dict(spec), f"roles.{role}")
    return backends.build(cfg, role, counter)


def is_in_process(backend: Any) -> bool:
    """Whether ``backend`` is a local Flax model the env can compile into its step."""
    return getattr(backend, "lm", None) is not None and getattr(backend, "tokenizer", None) is not None


def _params(backend: Any):
    params = getattr(backend, "params", None)
    return params if params is not None else backend.lm.params


def _decode(tokenizer, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
    return [tokenizer.decode([int(t) for t in row[:n]], skip_special_tokens=True).strip()
            for row, n in zip(tokens, lengths)]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text.strip(), add_special_tokens=False)["input_ids"])


@dataclasses.dataclass(frozen=True, eq=False)
class HostOperator:
    """Instructor behind any :class:`Backend` (HTTP): text in, text out, one ``complete`` per step.

    Same interface as the jitted operators (``apply(key, op_ids, tokens, lengths, params, active)``);
    runs on the host through ``io_callback``. A rewrite that is empty, cut by ``max_new_tokens``
    (``finish_reason == "length"``) or longer than the buffer keeps the old instruction; it still
    cost its query, and ``stats["rejected"]`` counts it.
    """

    backend: Any
    tokenizer: Any
    operations: tuple[str, ...]
    max_len: int
    max_new_tokens: int
    temperature: float = 0.7
    top_p: float = 0.95
    pad_id: int = 0
    chat: bool = True
    stats: dict = dataclasses.field(default_factory=lambda: {"calls": 0, "rows": 0, "rejected": 0})
    wants_active = True

    def apply(self, key, op_ids, tokens, lengths, params=None, active=None):
        """``(tokens [B, L], lengths [B], queries [B])``; rows with ``active == False`` are not sent."""
        if active is None:
            active = jnp.ones(op_ids.shape, bool)
        seed = jax.random.randint(key, (), 0, np.iinfo(np.int32).max)
        shapes = (jax.ShapeDtypeStruct(tokens.shape, jnp.int32), jax.ShapeDtypeStruct(lengths.shape, jnp.int32),
                  jax.ShapeDtypeStruct(op_ids.shape, jnp.float32))
        return jax.experimental.io_callback(self._host, shapes, op_ids, tokens, lengths, active, seed, ordered=False)

    def _host(self, op_ids, tokens, lengths, active, seed):
        from teams_rl_jax.env.prompts import render_prompt

        tokens, lengths = np.array(tokens, np.int32), np.array(lengths, np.int32)
        queries = np.zeros(op_ids.shape, np.float32)
        rows = np.nonzero(np.asarray(active))[0]
        if rows.size == 0:
            return tokens, lengths, queries
        texts = _decode(self.tokenizer, tokens[rows], lengths[rows])
        prompts = [render_prompt(self.operations[int(op_ids[r])], t) for r, t in zip(rows, texts)]
        if self.chat:
            prompts = [[{"role": "user", "content": p}] for p in prompts]
        outs = self.backend.complete(prompts, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                     top_p=self.top_p, seed=int(seed))
        if len(outs) != rows.size:
            raise BackendError(f"instructor returned {len(outs)} completions for {rows.size} prompts")
        self.stats["calls"] += 1
        self.stats["rows"] += int(rows.size)
        for r, out in zip(rows, outs):
            queries[r] = 1.0
            ids = _encode(self.tokenizer, out.text)
            if out.finish_reason == "length" or not ids or len(ids) > self.max_len:
                self.stats["rejected"] += 1
                continue
            tokens[r] = self.pad_id
            tokens[r, : len(ids)] = ids
            lengths[r] = len(ids)
        return tokens, lengths, queries


def host_reviewer_term(backend, tokenizer, *, name: str = "reviewer", chat: bool = True, max_new_tokens: int = 8):
    """The text judge as an env reward term (``role="reviewer"``, one query per live row).

    Decodes the old and new buffers, asks ``backend`` the comparison prompt (greedy), and reads the
    reply with :func:`parse_judgement`: 1.0 for "Not Equal", 0.0 for "Equal" and for a reply that
    says neither (counted in ``term.stats["unparsed"]``). Returns ``(RewardTerm, None)``.
    """
    from teams_rl_jax.env.judge import JUDGE_INSTRUCTION, judge_prompt, parse_judgement
    from teams_rl_jax.env.rewards import RewardTerm

    stats = {"calls": 0, "rows": 0, "unparsed": 0}

    def host(old_t, old_n, new_t, new_n, active):
        out = np.zeros(np.shape(old_n), np.float32)
        rows = np.nonzero(np.asarray(active))[0]
        if rows.size == 0:
            return out
        olds = _decode(tokenizer, np.asarray(old_t)[rows], np.asarray(old_n)[rows])
        news = _decode(tokenizer, np.asarray(new_t)[rows], np.asarray(new_n)[rows])
        if chat:
            prompts = [[{"role": "user", "content": JUDGE_INSTRUCTION.format(old=o, new=n)}] for o, n in zip(olds, news)]
        else:
            prompts = [judge_prompt(o, n) for o, n in zip(olds, news)]
        replies = backend.complete(prompts, max_new_tokens=max_new_tokens, temperature=0.0)
        stats["calls"] += 1
        stats["rows"] += int(rows.size)
        for r, rep in zip(rows, replies):
            v = parse_judgement(rep.text)
            stats["unparsed"] += v is None
            out[r] = 0.0 if v is None else v
        return out

    def fn(key, old, new, aux):
        active = aux.get("active")
        if active is None:
            active = jnp.ones(old.length.shape, bool)
        return jax.experimental.io_callback(host, jax.ShapeDtypeStruct(old.length.shape, jnp.float32),
                                            old.tokens, old.length, new.tokens, new.length, active, ordered=False)

    fn.stats = stats  # RewardTerm is frozen: the counts hang on its function (term.fn.stats)
    return RewardTerm(name, fn, role="reviewer", cost=1.0), None


def make_llm_env(env_kwargs: Mapping[str, Any] | None, roles: Any, *, counter=None):
    """``(env, env_params)`` of the LLM env from ``policy.env_kwargs`` and ``roles``.

    The instructor is required; without a reviewer the reward is the env's own terms only.
    ``reward_weights`` gets ``reviewer: 1.0`` by default when a reviewer is configured.
    """
    import jax.experimental  # noqa: F401  (io_callback)

    from teams_rl_jax.config import from_dict
    from teams_rl_jax.env import make
    from teams_rl_jax.env.prompts import operation_templates

    kwargs = dict(env_kwargs or {})
    specs = {r: _role(roles, r) for r in ROLE_NAMES}
    if any(s is not None for s in specs.values()) and not any(callable(getattr(s, "complete", None))
                                                               for s in specs.values()):
        # Configs only: build together, so two roles on one checkpoint share one loaded model.
        from teams_rl_jax import backends
        from teams_rl_jax.backends.config import RoleConfig, RolesConfig
        from teams_rl_jax.config import from_dict

        cfgs = {r: (s if s is None or isinstance(s, RoleConfig) else from_dict(RoleConfig, dict(s), f"roles.{r}"))
                for r, s in specs.items()}
        built = backends.build_roles(RolesConfig(**cfgs), counter)
        instructor, reviewer = built.get("instructor"), built.get("reviewer")
    else:
        instructor = build_backend(specs["instructor"], "instructor", counter)
        reviewer = build_backend(specs["reviewer"], "reviewer", counter)
    if instructor is None:
        raise ConfigError("roles.instructor: policy.env 'llm' needs an instructor (backend: flax or openai)")
    tokenizer_dir = kwargs.get("tokenizer")
    base = from_dict(EnvConfig, {k: v for k, v in kwargs.items() if k != "reward_weights"} | {"operator": "llm"},
                     "policy.env_kwargs")
    ops = tuple(op for op in base.operations if op != STOP)
    weights = dict(kwargs.get("reward_weights") or EnvConfig().reward_weights)
    if reviewer is not None:
        weights.setdefault("reviewer", 1.0)
    new_tokens = base.max_new_tokens or base.max_len
    host_roles = tuple(r for r, b in (("instructor", instructor), ("reviewer", reviewer))
                       if b is not None and not is_in_process(b))

    if is_in_process(instructor):
        from teams_rl_jax.env.llm_operator import LLMOperator

        tok = instructor.tokenizer
        operator, op_params = LLMOperator.create(instructor.lm, tok, operation_templates(ops), max_len=base.max_len,
                                                 max_new_tokens=new_tokens, temperature=base.temperature,
                                                 top_p=base.top_p)
        op_params = op_params.replace(lm_params=_params(instructor))
    else:
        if tokenizer_dir is None:
            flax_role = reviewer if reviewer is not None and is_in_process(reviewer) else None
            if flax_role is None:
                raise ConfigError("policy.env_kwargs.tokenizer: an HTTP instructor needs a local tokenizer dir for "
                                  "the instruction buffers (e.g. the served model's own tokenizer)")
            tok = flax_role.tokenizer
        else:
            from teams_rl_jax.data.tokenizer import load_tokenizer

            tok = load_tokenizer(tokenizer_dir)
        from teams_rl_jax.data.tokenizer import choose_pad_id, eos_token_ids

        pad = choose_pad_id(tok, eos_token_ids(tok))  # pad is never EOS (id 0 is a real token in Llama-3)
        chat = bool(getattr(getattr(instructor, "config", None), "chat", True))
        operator = HostOperator(instructor, tok, ops, base.max_len, new_tokens, base.temperature, base.top_p,
                                int(pad), chat)
        op_params = jnp.zeros((), jnp.float32)

    terms, term_params = [], {}
    if reviewer is not None:
        if is_in_process(reviewer) and is_in_process(instructor):
            from teams_rl_jax.env.judge import reviewer_term

            # env_tokenizer: the reviewer reads the env's buffers (the instructor's ids); the judge
            # checks the two tokenizers agree instead of mixing ids silently (issue 7, defect 7).
            try:
                term, _ = reviewer_term(reviewer.lm, reviewer.tokenizer, env_tokenizer=tok)
                term_params[term.name] = _params(reviewer)
            except ConfigError:  # different tokenizers: the reviewer reads text instead of ids
                term, _ = host_reviewer_term(reviewer, tok)
                host_roles = host_roles + ("reviewer",)
        else:
            term, _ = host_reviewer_term(reviewer, tok)
        terms.append(term)
    env, params = make("llm", base, tokenizer=tok, operator=operator, operator_params=op_params,
                       reward_terms=terms, term_params=term_params, reward_weights=weights)
    return dataclasses.replace(env, host_roles=host_roles), params
