"""The six Evol-Instruct operations (the env's actions) and the registry that maps names to edits.

An operation is registered by name with how the LLM-free token-edit operator realises it (an edit
*kind* plus the phrase bank it draws from, see ``env.token_edit``) and the key of its LLM prompt
template (``env.prompts``). ``EnvConfig.operations`` chooses which registered operations are the
actions, in order; the default is :data:`OPERATIONS`.
"""

from __future__ import annotations

import dataclasses

from teams_rl_jax.env.registry import Registry

# Action order of the paper's six operations (docs/design.md; keep in sync with rl/config.py).
OPERATIONS = (
    "add_constraints",
    "deepening",
    "concretizing",
    "increase_reasoning_steps",
    "complicate_input",
    "breadth",
)

# The reference code's index order of the operations in its one-hot observation (the decoder of
# ``Evol_gpt_policy.step``; ``observation: paper``), by our names.
REFERENCE_ORDER = (
    "breadth",
    "add_constraints",
    "deepening",
    "concretizing",
    "increase_reasoning_steps",
    "complicate_input",
)

# The action that ends an episode: no rewrite, no query, the instruction is kept. Add it to
# ``EnvConfig.operations`` to let the policy decide when one more evolution is not worth its queries
# (with a query budget, the Lagrangian then has something to trade). Operators never see it.
STOP = "stop"


@dataclasses.dataclass(frozen=True)
class OperationSpec:
    """How an operation is carried out.

    ``kind``: the token-edit kind (``"append"``, ``"swap"``, ``"recombine"``; see
    ``token_edit.EDIT_KINDS``); ``bank``: key of its phrase bank in ``phrases.BANKS``;
    ``prompt``: key of its LLM template in ``prompts.OPERATION_PROMPTS``.
    """

    name: str
    kind: str
    bank: str
    prompt: str


OPERATION_REGISTRY: Registry[OperationSpec] = Registry("operation")


def register_operation(name: str, kind: str, bank: str, prompt: str | None = None) -> OperationSpec:
    """Register (or replace) operation ``name``; returns its spec."""
    spec = OperationSpec(name=name, kind=kind, bank=bank, prompt=prompt or name)
    OPERATION_REGISTRY.register(name, spec)
    return spec


# add_constraints injects a constraint clause, deepening / increase_reasoning_steps append a request,
# complicate_input attaches a table or JSON block, concretizing swaps a generic term for a specific
# one (appending a "be specific" clause when no generic term is left), breadth starts a rarer prompt
# from another seed of the same domain.
register_operation("add_constraints", "append", "add_constraints")
register_operation("deepening", "append", "deepening")
register_operation("concretizing", "swap", "concretizing")
register_operation("increase_reasoning_steps", "append", "increase_reasoning_steps")
register_operation("complicate_input", "append", "complicate_input")
register_operation("breadth", "recombine", "breadth")
register_operation(STOP, "stop", "", prompt=STOP)  # handled by the env itself, never by an operator
