"""The generate stage: the trained policy steers LLM roles over seed instructions into an SFT dataset.

(Named ``evolve`` because ``teams_rl_jax.generate`` is already the LM decode function.)

``run_generate_stage(GenerateConfig, run_dir, roles)`` -> ``run_dir/data/generated.jsonl`` +
``summary.json``. Modules: ``config`` (:class:`GenerateConfig`), ``records`` (crash-safe
JSONL; seeds come from ``teams_rl_jax.data.seeds``), ``selectors`` (policy / random / fixed), ``operators`` (LLM role or token edit),
``filters`` (elimination rules, duplicates), ``stage``.
"""

from teams_rl_jax.evolve.config import GenerateConfig
from teams_rl_jax.data.seeds import Seed, read_seeds

__all__ = ["GenerateConfig", "Seed", "outputs_complete", "read_seeds", "run_generate_stage"]


def __getattr__(name):
    # Lazy: the pipeline's config (GenerateConfig) must not import jax, the env or the encoder.
    if name in ("run_generate_stage", "outputs_complete"):
        from teams_rl_jax.evolve import stage

        return getattr(stage, name)
    raise AttributeError(name)
