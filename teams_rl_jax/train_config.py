"""``TrainConfig``: the whole pipeline's config (run dir, stages, roles, each stage's section).

Its own module so that other commands built on the pipeline (``teams_rl_jax.experiment``) can use it
without importing the ``train`` CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from teams_rl_jax.backends.config import RolesConfig
from teams_rl_jax.errors import ConfigError
from teams_rl_jax.eval.config import EvalConfig
from teams_rl_jax.evolve.config import GenerateConfig
from teams_rl_jax.layout import STAGES
from teams_rl_jax.rl.config import PolicyConfig
from teams_rl_jax.roles.prompts import load_prompts
from teams_rl_jax.sft.config import SFTConfig


@dataclass(frozen=True)
class TrainConfig:
    """The whole pipeline: run directory, which stages, the LLM roles, and each stage's own config."""

    run_dir: str = "runs/default"
    stages: tuple[str, ...] = STAGES
    # "auto": call jax.distributed.initialize() under SLURM / a TPU pod / explicit coordinator env vars.
    distributed: Literal["auto", "on", "off"] = "auto"
    # Small-scale offline run: a roles.expert left unset becomes a tiny random Llama (+ word tokenizer)
    # saved under run_dir/models/tiny-expert and served through the flax backend like a 7B model.
    offline_demo: bool = False
    # One seed file for both stages (the policy env's and the generate stage's): Alpaca JSON (a list),
    # JSONL or Parquet of {instruction, input?, id?, domain?}; null = the bundled seeds (offline default).
    seeds: str | None = None
    # The roles' wording: a YAML file of the six operation templates ({instruction}) and the judge
    # template ({old}, {new}), for both stages (roles/prompts.py); null = our shipped wording.
    prompts: str | None = None
    roles: RolesConfig = field(default_factory=RolesConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        """Check stage names, the one seed setting, and the prompts file (loaded once to check it)."""
        for s in self.stages:
            if s not in STAGES:
                raise ConfigError(f"stages: unknown stage {s!r} (valid: {', '.join(STAGES)})")
        if self.policy.env_config.seeds_path is not None:
            raise ConfigError("policy.env_config.seeds_path: the pipeline's seeds are the top-level 'seeds' key "
                              "(one file for the policy and generate stages); set seeds: PATH instead")
        load_prompts(self.prompts)
