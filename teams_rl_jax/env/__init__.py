"""Instruction-evolution environment: RL picks which Evol-Instruct operation to apply, step by step.

``env, env_params = make("token_edit")`` builds the LLM-free env (pure-jnp token edits from phrase
banks, 0 queries) on the 48 packaged seeds with an offline word-level tokenizer; ``make("llm",
config, roles=roles)`` builds the instructor and reviewer from the pipeline's roles, and ``make("llm",
operator=..., operator_params=...)`` plugs in an operator object. ``make`` is the one factory
(``factory``, gymnax's registration). Interfaces: docs/design.md. Modules: ``operations`` (the six
actions, registry), ``prompts`` (instructor templates), ``phrases`` (banks, word lists),
``token_edit`` (operator), ``llm_operator`` (jitted instructor), ``judge`` (jitted reviewer),
``rewards`` and ``elimination`` (registries), ``embedding``, ``seeds`` (SeedBatch, decode),
``byte_tokenizer`` (lossless text encoding for HTTP roles), ``spaces``, ``environment``, ``factory``.
"""

from teams_rl_jax.env.buffers import Instruction
from teams_rl_jax.env.config import EnvConfig
from teams_rl_jax.env.elimination import ELIMINATION_RULES, EliminationRule, eliminate, register_rule
from teams_rl_jax.env.embedding import EMBEDDINGS, hashed_embed, init_hashed
from teams_rl_jax.env.environment import EnvParams, EnvState, EvolveEnv, build_env
from teams_rl_jax.env.factory import make, register_env
from teams_rl_jax.env.operations import OPERATION_REGISTRY, OPERATIONS, STOP, register_operation
from teams_rl_jax.env.prompts import OPERATION_PROMPTS, operation_templates, render_prompt, template_pieces
from teams_rl_jax.env.rewards import REWARD_TERMS, RewardTerm, register_term
from teams_rl_jax.env.seeds import SeedBatch, decode, offline_tokenizer, read_seed_records, seeds_from_texts
from teams_rl_jax.env.token_edit import TokenEditOperator, TokenEditParams, build_token_edit

__all__ = [
    "ELIMINATION_RULES", "EMBEDDINGS", "OPERATIONS", "OPERATION_PROMPTS", "OPERATION_REGISTRY", "REWARD_TERMS", "STOP",
    "EliminationRule", "EnvConfig", "build_env", "register_env", "EnvParams", "EnvState", "EvolveEnv", "Instruction", "RewardTerm", "SeedBatch",
    "TokenEditOperator", "TokenEditParams", "build_token_edit", "decode", "eliminate", "hashed_embed", "init_hashed",
    "make", "offline_tokenizer", "operation_templates", "read_seed_records", "register_operation", "register_rule",
    "register_term", "render_prompt", "seeds_from_texts", "template_pieces",
]
