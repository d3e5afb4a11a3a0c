"""``ExperimentConfig``: the pipeline's sections plus the ``experiment:`` section (arms, seed split)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from teams_rl_jax.errors import ConfigError
from teams_rl_jax.evolve.config import PROTOCOLS
from teams_rl_jax.train_config import TrainConfig

ARMS = ("policy", "random", "fixed", "wizardlm")
EQUAL_BUDGET = ("random", "fixed")  # get max_queries = the policy arm's generation queries


@dataclass(frozen=True)
class ExperimentSection:
    """Which arms, the generation protocol of the equal-budget arms, and the member / non-member split."""

    arms: tuple[str, ...] = ARMS
    # Protocol of the policy, random and fixed arms; None: the config's generate.protocol (the paper
    # preset's paper), which must then be filtered or paper.
    protocol: Literal["filtered", "paper"] | None = None
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
        if self.protocol is not None and (self.protocol not in PROTOCOLS or self.protocol == "wizardlm"):
            raise ConfigError(f"experiment.protocol: {self.protocol!r} (valid: filtered, paper)")
        if not 0.0 < self.member_fraction < 1.0:
            raise ConfigError(f"experiment.member_fraction must be in (0, 1), got {self.member_fraction}")
        if self.wizardlm_rounds < 1:
            raise ConfigError(f"experiment.wizardlm_rounds must be >= 1, got {self.wizardlm_rounds}")


@dataclass(frozen=True)
class ExperimentConfig(TrainConfig):
    """The pipeline's config (shared by every arm; ``stages`` is not used) plus the ``experiment:`` section."""

    run_dir: str = "runs/experiment"
    distributed: Literal["auto", "on", "off"] = "off"  # one host: the arms run one after another
    experiment: ExperimentSection = field(default_factory=ExperimentSection)

    def validate(self) -> None:
        """The pipeline's checks; the SFT data and MIA members are the experiment's, per arm."""
        super().validate()
        self.experiment.validate()
        if self.arm_protocol not in ("filtered", "paper"):
            raise ConfigError(f"generate.protocol: {self.arm_protocol!r} cannot be the arms' protocol (filtered or "
                              "paper; the wizardlm arm has its own); set experiment.protocol")
        if self.sft.data.path != "auto":
            raise ConfigError("sft.data.path: each arm fine-tunes on its own member records; leave it 'auto'")
        if self.eval.mia.members != "auto" or self.eval.mia.non_members != "auto":
            raise ConfigError("eval.mia.members/non_members: the experiment sets them per arm; leave them 'auto'")

    @property
    def arm_protocol(self) -> str:
        """The generation protocol of the policy, random and fixed arms."""
        return self.experiment.protocol or self.generate.protocol

    def pipeline(self, **sections) -> TrainConfig:
        """This config as the pipeline's ``TrainConfig`` (``sections`` replace its own)."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{**own, **sections})
