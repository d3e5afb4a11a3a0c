"""teams_rl_jax.eval: benchmarks, the lm-eval adapter, membership inference and dataset reports.

Importing this package registers the lm-eval model ``teams_rl_jax`` (when lm-eval, the ``eval``
extra, is installed), so ``lm_eval.simple_evaluate(model="teams_rl_jax", ...)`` works afterwards.

* :mod:`.tasks` - ARC / HellaSwag / MMLU / TruthfulQA readers for local JSONL/Parquet files
* :mod:`.multiple_choice` - batched jitted log-likelihood scorer, acc / acc_norm as lm-eval
* :mod:`.harness` - the lm-eval model and ``python -m teams_rl_jax.eval.harness``
* :mod:`.mia` - loss and reference-calibrated membership inference (ROC AUC, TPR@1%FPR, ROC plot)
* :mod:`.dataset_report` - size, lengths, distinct-n, MiniLM diversity, complexity, ops, queries
* :mod:`.report` - Markdown + PNG + report.json, byte-identical on regeneration
* :mod:`.stage` - the pipeline's eval stage; ``python -m teams_rl_jax.eval`` is the CLI
"""

from teams_rl_jax.eval.config import EvalConfig

try:  # lm-eval is an optional extra; without it everything but the adapter works
    import lm_eval as _lm_eval  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    pass
else:
    from teams_rl_jax.eval import harness as _harness  # noqa: F401  (registers "teams_rl_jax")

__all__ = ["EvalConfig"]
