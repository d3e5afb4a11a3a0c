"""teams_rl_jax.eval: benchmarks, the lm-eval adapter, membership inference and dataset reports.

Importing this package registers the lm-eval model ``teams_rl_jax`` (when lm-eval, the ``eval``
extra, is installed), so ``lm_eval.simple_evaluate(model="teams_rl_jax", ...)`` works afterwards.

* :mod:`.tasks` - ARC / HellaSwag / MMLU / TruthfulQA readers for local JSONL/Parquet files
* :mod:`.multiple_choice` - batched jitted log-likelihood scorer, acc / acc_norm as lm-eval
* :mod:`.harness` - the lm-eval model and ``python -m teams_rl_jax.eval.harness``
* :mod:`.mia` - loss and reference-calibrated membership inference (ROC AUC, TPR@1%FPR, ROC plot)
* :mod:`.dataset_report` - size, lengths, distinct-n, MiniLM diversity, complexity, ops, queries
* :mod:`.decontaminate` - n-gram overlap of generated records with the benchmarks (lm-eval's normalisation)
* :mod:`.report` - Markdown + PNG + report.json, byte-identical on regeneration
* :mod:`.stage` - the pipeline's eval stage; ``python -m teams_rl_jax.eval`` is the CLI
"""

from teams_rl_jax.eval.config import EvalConfig

try:  # lm-eval is an optional extra; without it everything but the adapter works
    import lm_eval.api.registry as _registry
    import lm_eval.models  # noqa: F401 - lm-eval's lazy table of its own models (cheap: imports no backend)
except ImportError:  # pragma: no cover - depends on the environment
    pass
else:
    # A lazy placeholder: the adapter (and jax/transformers) is imported only when lm-eval asks for
    # the model, so importing this package (e.g. for EvalConfig in train.py) stays fast.
    if "teams_rl_jax" not in _registry.model_registry:
        _registry.model_registry.register("teams_rl_jax", target="teams_rl_jax.eval.harness:TeamsRLJaxLM")

__all__ = ["EvalConfig"]
