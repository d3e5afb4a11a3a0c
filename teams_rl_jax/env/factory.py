"""The one env factory (gymnax's ``registration.make``): every env the stages build, by name.

``env, env_params = make(name, config, roles=..., **objects)``:

* ``"token_edit"``: the LLM-free env (phrase-bank edits, 0 queries);
* ``"llm"``: the instructor-LM env. With ``roles`` (the pipeline's ``roles`` section, or built
  backends) the instructor and reviewer are built here: in-process Flax roles become the jitted
  operator (``env.llm_operator``) and logit judge (``env.judge``); a role behind HTTP becomes the
  text role through ``env.host_roles`` (``io_callback``; the stage then steps the env from Python). Without
  ``roles`` pass ``operator=``/``operator_params=`` (and reward terms) as objects;
* other names registered with :func:`register_env` (``rl.testing`` registers ``"synthetic"``).

The instruction buffers' tokenizer (:func:`buffer_tokenizer`): ``EnvConfig.tokenizer`` when set,
else a Flax instructor's own tokenizer, else (an HTTP instructor and no local tokenizer) the env's
lossless byte-level encoding (``env.byte_tokenizer``): lengths in the served model's tokens then
come from the endpoint's ``usage`` (``Instruction.served``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax.numpy as jnp

from teams_rl_jax import backends
from teams_rl_jax.backends.config import RoleConfig, RolesConfig, max_new_tokens, role_config
from teams_rl_jax.config import from_dict
from teams_rl_jax.data.tokenizer import choose_pad_id, eos_token_ids, load_tokenizer
from teams_rl_jax.env.byte_tokenizer import byte_level_tokenizer
from teams_rl_jax.env.config import EnvConfig
from teams_rl_jax.env.environment import EnvParams, EvolveEnv, build_env
from teams_rl_jax.env.host_roles import HostOperator, host_reviewer_term
from teams_rl_jax.env.judge import decoded_reviewer_term, reviewer_term
from teams_rl_jax.env.llm_operator import LLMOperator
from teams_rl_jax.env.operations import STOP
from teams_rl_jax.env.prompts import operation_templates
from teams_rl_jax.env.registry import Registry
from teams_rl_jax.env.seeds import read_seed_records
from teams_rl_jax.errors import ConfigError
from teams_rl_jax.roles.instructor import Instructor
from teams_rl_jax.roles.prompts import DEFAULT_PROMPTS, Prompts
from teams_rl_jax.roles.reviewer import Reviewer

ROLE_NAMES = ("instructor", "reviewer")
EnvBuilder = Callable[..., "tuple[Any, Any]"]
ENVS: Registry[EnvBuilder] = Registry("env")


def register_env(name: str, builder: EnvBuilder) -> EnvBuilder:
    """Register ``builder(config, *, roles, counter, seed, **objects) -> (env, params)`` as ``name``."""
    return ENVS.register(name, builder)


def make(name: str = "token_edit", config: EnvConfig | Mapping | None = None, *, roles: Any = None,
         counter=None, seed: int = 0, prompts: Prompts | None = None, **objects) -> tuple[Any, Any]:
    """``(env, env_params)`` of env ``name`` (see the module docstring). ``config``: an
    :class:`EnvConfig` or a dict of its fields; ``objects``: Python objects and field overrides
    (``tokenizer``, ``seeds``, ``operator`` ...; see ``environment.build_env``); ``seed``: the run's
    seed, for envs that draw their seed pool at random (``synthetic``); ``prompts``: the roles'
    wording (a loaded ``prompts:`` file; None: ours), for the roles built from ``roles``."""
    extra = {"prompts": prompts} if prompts is not None else {}
    return ENVS.get(name)(config, roles=roles, counter=counter, seed=seed, **extra, **objects)


def _token_edit(config, *, roles=None, counter=None, seed=0, prompts=None, **objects):
    return build_env("token_edit", config, **objects)  # no LLM: the prompts are not used


def _llm(config, *, roles=None, counter=None, seed=0, prompts=None, **objects):
    if roles is None:
        return build_env("llm", config, **objects)
    return make_llm_env(config, roles, counter=counter, prompts=prompts, **objects)


register_env("token_edit", _token_edit)
register_env("llm", _llm)


# ------------------------------------------------------------------------------------------ LLM env
def _role(roles: Any, name: str) -> Any:
    if roles is None:
        return None
    return roles.get(name) if isinstance(roles, Mapping) else getattr(roles, name, None)


def _is_built(spec: Any) -> bool:
    return callable(getattr(spec, "complete", None))


def is_in_process(backend: Any) -> bool:
    """Whether ``backend`` is a local Flax model the env can compile into its step."""
    return getattr(backend, "lm", None) is not None and getattr(backend, "tokenizer", None) is not None


def role_configs(roles: Any) -> dict[str, RoleConfig | None]:
    """``{role: RoleConfig}`` of the env's roles (a built backend's entry is None)."""
    out = {}
    for r in ROLE_NAMES:
        spec = _role(roles, r)
        if spec is None or _is_built(spec) or isinstance(spec, RoleConfig):
            out[r] = None if _is_built(spec) else spec
        else:
            out[r] = from_dict(RoleConfig, dict(spec), f"roles.{r}")
    return out


def build_env_roles(roles: Any, counter=None) -> dict[str, Any]:
    """``{role: backend}`` for the instructor and reviewer (configs built together, so two roles on
    one checkpoint share one loaded model; built backends used as they are)."""
    cfgs = role_configs(roles)
    built = backends.build_roles(RolesConfig(**cfgs), counter)
    return {r: (_role(roles, r) if _is_built(_role(roles, r)) else built.get(r)) for r in ROLE_NAMES}


def buffer_tokenizer(config: EnvConfig, instructor: Any):
    """``(tokenizer, buffer_is_served)`` for the instruction buffers (see the module docstring)."""
    if config.tokenizer is not None:
        return load_tokenizer(config.tokenizer), True
    if isinstance(instructor, RoleConfig):  # a config, not yet built (the generate stage's rebuild)
        if instructor.backend == "flax":
            return load_tokenizer(instructor.checkpoint), True
    elif is_in_process(instructor):
        return instructor.tokenizer, True
    texts, _ = read_seed_records(config.seeds_path, config.seed_field, config.max_seeds)
    return byte_level_tokenizer(texts, config.vocab_size), False


def _params(backend: Any):
    params = getattr(backend, "params", None)
    return params if params is not None else backend.lm.params


def _operator(config: EnvConfig, instructor, tok, roles, ops, prompts: Prompts | None = None):
    """The instructor as the env's operator: jitted in-process, else the text role on the host."""
    new_tokens = max_new_tokens(roles, "instructor", instructor)
    if is_in_process(instructor) and tok is instructor.tokenizer:
        op, op_params = LLMOperator.create(instructor.lm, tok, operation_templates(ops, prompts), max_len=config.max_len,
                                           max_new_tokens=new_tokens,
                                           temperature=config.temperature, top_p=config.top_p,
                                           chat=bool(getattr(instructor, "chat", True)))
        return op, op_params.replace(lm_params=_params(instructor))
    text = Instructor(instructor, new_tokens, config.temperature, config.top_p, prompts=prompts)
    pad = choose_pad_id(tok, eos_token_ids(tok))  # pad is never EOS (id 0 is a real token in Llama-3)
    return HostOperator(text, tok, ops, config.max_len, int(pad)), jnp.zeros((), jnp.float32)


def _reviewer(reviewer, tok, roles, jitted_ok: bool, reward: str = "shaped", prompts: Prompts | None = None):
    """``(term, term_params or None, on_host)``: where the reviewer is in-process and reads the env's
    own ids, the jitted judge (``reward: reviewer_binary``: the reply decoded greedily in the step and
    parsed with ``roles.reviewer.parser``, ``exact`` for a built backend without a config; otherwise
    P(Not Equal) from one forward pass); else the text reviewer on the host (``reviewer_soft`` needs
    the jitted judge). ``prompts`` supply the judge template (None: ours)."""
    judge = (prompts or DEFAULT_PROMPTS).judge
    cfg = role_config(roles, "reviewer", reviewer)
    parser = cfg.parser if cfg else ("exact" if reward == "reviewer_binary" else "lenient")
    new_tokens = max_new_tokens(roles, "reviewer", reviewer)
    if jitted_ok and is_in_process(reviewer):
        chat = bool(getattr(reviewer, "chat", True))
        try:  # env_tokenizer: the judge refuses buffers of another tokenizer instead of mixing ids
            if reward == "reviewer_binary":  # decoded in the step; only the parse runs on the host
                term, _ = decoded_reviewer_term(reviewer.lm, reviewer.tokenizer, parser=parser, max_new_tokens=new_tokens,
                                                env_tokenizer=tok, chat=chat, instruction=judge,
                                                checkpoint=cfg.checkpoint if cfg else None)
            else:
                term, _ = reviewer_term(reviewer.lm, reviewer.tokenizer, env_tokenizer=tok, chat=chat,
                                        instruction=judge)
            return term, _params(reviewer), False
        except ConfigError:  # different tokenizers: the reviewer reads text instead of ids
            pass
    if reward == "reviewer_soft":
        raise ConfigError("policy.env_config.reward: reviewer_soft needs an in-process (flax) reviewer and "
                          "instructor on the env's tokenizer; use reviewer_binary for a text reviewer")
    text = Reviewer(reviewer, new_tokens, parser, judge)
    return host_reviewer_term(text, tok), None, True


def instruction_width(fields: Mapping, roles: Any, instructor: Any = None, served: bool = True) -> int:
    """The LLM env's instruction buffer width: ``roles.instructor.max_new_tokens`` (the rewrite limit of
    both stages, so the policy trains on the rewrites generation will keep). ``max_len`` set to another
    value is a ConfigError, except where the buffers do not hold the instructor's tokens (``served``
    False: the byte-level encoding of an HTTP instructor, another unit) or the instructor is a built
    backend without a role config: there ``max_len`` is used when set."""
    given = fields.get("max_len")
    if given is not None and (not served or role_config(roles, "instructor", instructor) is None):
        return int(given)
    width = max_new_tokens(roles, "instructor", instructor)
    if given is not None and int(given) != width:
        raise ConfigError(f"policy.env_config.max_len: {given} differs from roles.instructor.max_new_tokens {width}; "
                          "the LLM env's instruction buffer is the instructor's rewrite limit: set only max_new_tokens")
    return width


def make_llm_env(config: EnvConfig | Mapping | None, roles: Any, *, counter=None, prompts: Prompts | None = None,
                 **objects):
    """``(env, env_params)`` of the LLM env from ``config`` and ``roles`` (instructor required; without
    a reviewer the reward is the env's own terms; ``reward_weights`` gets ``reviewer: 1.0`` by
    default when a reviewer is configured). ``config.reward`` picks the reviewer's form (``_reviewer``)."""
    built = build_env_roles(roles, counter)
    instructor, reviewer = built["instructor"], built["reviewer"]
    if instructor is None:
        raise ConfigError("roles.instructor: policy.env 'llm' needs an instructor (backend: flax or openai)")
    fields = _fields(config) | {"operator": "llm"}
    base = from_dict(EnvConfig, fields, "policy.env_config")
    tok, is_served = buffer_tokenizer(base, instructor)
    base = dataclasses.replace(base, max_len=instruction_width(fields, roles, instructor, is_served))
    ops = tuple(op for op in base.operations if op != STOP)
    operator, op_params = _operator(base, instructor, tok, roles, ops, prompts)
    host_roles = () if isinstance(operator, LLMOperator) else ("instructor",)
    weights = dict(base.reward_weights)
    terms, term_params = [], {}
    if reviewer is not None:
        weights.setdefault("reviewer", 1.0)
        term, params, on_host = _reviewer(reviewer, tok, roles, jitted_ok=not host_roles, reward=base.reward,
                                          prompts=prompts)
        terms.append(term)
        if params is not None:
            term_params[term.name] = params
        host_roles += ("reviewer",) if on_host else ()
    env, params = build_env("llm", base, tokenizer=tok, operator=operator, operator_params=op_params,
                            reward_terms=terms, term_params=term_params, reward_weights=weights,
                            buffer_is_served=is_served, **objects)
    return dataclasses.replace(env, host_roles=host_roles), params


def _fields(config: EnvConfig | Mapping | None) -> dict:
    if isinstance(config, EnvConfig):
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return dict(config or {})


def observation_env(name: str, config: EnvConfig, roles: Any = None) -> tuple[EvolveEnv, EnvParams]:
    """The token-edit build of env ``name``'s settings: the same tokenizer, embedding and episode
    length, so the same observation of a text (the generate stage feeds a trained policy with it).
    Builds no LLM: a Flax instructor's tokenizer is read from its checkpoint dir."""
    if name == "token_edit":
        return make("token_edit", config)
    if name != "llm":
        raise ConfigError(f"generate: cannot rebuild the observation of policy env {name!r} (token_edit or llm)")
    # The reward is not part of the observation: the shaped default, so a reviewer reward needs no reviewer here.
    fields = _fields(config) | {"operator": "token_edit", "reward": "shaped"}
    fields.pop("reward_weights", None)
    instructor = role_configs(roles).get("instructor") if roles is not None else None
    base = from_dict(EnvConfig, fields, "policy.env_config")
    tok, is_served = buffer_tokenizer(base, instructor)
    if instructor is not None:  # the policy stage's buffer width (make_llm_env), so the same truncation
        base = dataclasses.replace(base, max_len=instruction_width(fields, roles, instructor, is_served))
    ops = tuple(op for op in base.operations if op != STOP)
    return build_env("token_edit", dataclasses.replace(base, operations=ops), tokenizer=tok,
                     buffer_is_served=is_served)
