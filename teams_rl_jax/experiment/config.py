"""``ExperimentConfig``: the pipeline's sections plus the ``experiment:`` section (arms, seed split)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from teams_rl_jax.backends.config import RolesConfig
from teams_rl_jax.errors import ConfigError
from teams_rl_jax.eval.config import EvalConfig
from teams_rl_jax.evolve.config import PROTOCOLS, GenerateConfig
from teams_rl_jax.rl.config import PolicyConfig
from teams_rl_jax.roles.prompts import load_prompts
from teams_rl_jax.sft.config import SFTConfig

ARMS = ("policy", "random", "fixed", "wizardlm")
EQUAL_BUDGET = ("random", "fixed")  # get max_queries = the policy arm's generation queries


@dataclass(frozen=True)
class ExperimentSection:
    """Which arms, the generation protocol of the equal-budget arms, and the member / non-member split."""

    arms: tuple[str, ...] = ARMS
    protocol: Literal["filtered", "paper"] = "filtered"  # policy, random and fixed arms (paper preset: paper)
    wizardlm_rounds: int = 4  # WizardLM's M
    member_fraction: float = 0.5  # seeds whose records are the SFT set (the rest: the MIA's non-members)
    split_seed: int = 0

    def validate(self) -> None:
        """Names and ranges."""
        for a in self.arms:
            if a not in ARMS:
                raise ConfigError(f"experiment.arms: unknown arm {a!r} (valid: {', '.join(ARMS)})")
        if set(EQUAL_BUDGET) & set(self.arms) and "policy" not in self.arms:
            raise ConfigError("experiment.arms: random and fixed get the policy arm's budget; include 'policy'")
        if self.protocol not in PROTOCOLS or self.protocol == "wizardlm":
            raise ConfigError(f"experiment.protocol: {self.protocol!r} (valid: filtered, paper)")
        if not 0.0 < self.member_fraction < 1.0:
            raise ConfigError(f"experiment.member_fraction must be in (0, 1), got {self.member_fraction}")
        if self.wizardlm_rounds < 1:
            raise ConfigError(f"experiment.wizardlm_rounds must be >= 1, got {self.wizardlm_rounds}")


@dataclass(frozen=True)
class ExperimentConfig:
    """The experiment dir, the pipeline's settings shared by every arm, and the ``experiment:`` section."""

    run_dir: str = "runs/experiment"
    offline_demo: bool = False  # roles.expert unset -> the tiny random Llama under run_dir/models/tiny-expert
    seeds: str | None = None  # one seed file (split into members and non-members); null = the bundled seeds
    prompts: str | None = None
    roles: RolesConfig = field(default_factory=RolesConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    experiment: ExperimentSection = field(default_factory=ExperimentSection)

    def validate(self) -> None:
        """The pipeline's one-seed-setting rule and the prompts file; the SFT and MIA data are the experiment's."""
        if self.policy.env_config.seeds_path is not None:
            raise ConfigError("policy.env_config.seeds_path: the experiment's seeds are the top-level 'seeds' key")
        if self.sft.data.path != "auto":
            raise ConfigError("sft.data.path: each arm fine-tunes on its own member records; leave it 'auto'")
        if self.eval.mia.members != "auto" or self.eval.mia.non_members != "auto":
            raise ConfigError("eval.mia.members/non_members: the experiment sets them per arm; leave them 'auto'")
        load_prompts(self.prompts)
