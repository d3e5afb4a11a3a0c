"""``EvalConfig``: the eval stage (``eval:`` in the pipeline YAML).

Three parts, each optional:

* ``benchmarks``: multiple-choice log-likelihood tasks (ARC, HellaSwag, MMLU, TruthfulQA) read from a
  local ``data_dir``; skipped when ``data_dir`` is unset (nothing is ever downloaded).
* ``mia``: membership inference on the fine-tuned checkpoint (loss attack, and the reference-calibrated
  attack when a ``reference`` checkpoint is given).
* ``report``: the dataset / query-efficiency report of ``run/data/generated.jsonl`` side by side with
  the baselines under ``run/data/baselines/<name>/`` (``compare``), as Markdown + PNG + JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from teams_rl_jax.errors import ConfigError

ALL_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2")


@dataclass(frozen=True)
class BenchmarkSection:
    """Multiple-choice benchmarks over local files (layouts: see :mod:`teams_rl_jax.eval.tasks`)."""

    data_dir: str | None = None  # None: benchmarks are skipped
    tasks: tuple[str, ...] = ALL_TASKS
    limit: int | None = None  # first N examples per task (None: all)
    batch_size: int = 32  # (context, choice) rows per jitted call
    max_length: int = 2048  # tokens; longer inputs are left-truncated (as lm-eval does)
    dtype: Literal["float32", "bfloat16"] = "float32"
    # device mesh for 7B: params sharded by the models' logical axes, rows over data*fsdp
    mesh_data: int = -1
    mesh_fsdp: int = 1
    mesh_tensor: int = 1
    # With data_dir set, the run's data/generated.jsonl is always checked for n-gram overlap with every
    # task found there (teams_rl_jax.eval.decontaminate): report.json's "decontamination".
    decontaminate_n: int = 13

    def validate(self) -> None:
        """Known tasks, positive sizes."""
        if self.decontaminate_n < 1:
            raise ConfigError(f"decontaminate_n must be >= 1, got {self.decontaminate_n}")
        for t in self.tasks:
            if t not in ALL_TASKS:
                raise ConfigError(f"tasks: unknown task {t!r} (valid: {', '.join(ALL_TASKS)})")
        if self.batch_size < 1 or self.max_length < 2 or (self.limit is not None and self.limit < 1):
            raise ConfigError("need batch_size >= 1, max_length >= 2, limit >= 1 (or null)")


@dataclass(frozen=True)
class MIASection:
    """Membership inference: members = the SFT training set, non-members = held-out records.

    ``members``/``non_members`` "auto": members are the records the SFT stage trained on
    (``run/data/generated.jsonl``, else the bundled demo set); non-members are the records of the
    ``compare`` baselines' datasets that are not in the training set, else the bundled demo set's
    records that are not in it. A path overrides either.
    """

    enabled: bool = True
    members: str = "auto"
    non_members: str = "auto"
    reference: str | None = None  # a reference checkpoint dir (e.g. the pre-SFT base model)
    max_examples: int = 256  # per side, first N (keeps the stage fast; both sides capped alike)
    batch_size: int = 16
    max_seq_len: int | None = None  # None: the SFT stage's sft.data.max_seq_len (run/config.yaml), else 256
    # the SFT template (the attack's loss is the SFT loss); "auto": sft.data.template of run/config.yaml
    template: Literal["auto", "alpaca", "vicuna", "chat"] = "auto"

    def validate(self) -> None:
        """Positive sizes."""
        if self.max_examples < 2 or self.batch_size < 1 or (self.max_seq_len is not None and self.max_seq_len < 8):
            raise ConfigError("need max_examples >= 2, batch_size >= 1, max_seq_len >= 8")


@dataclass(frozen=True)
class ReportSection:
    """Dataset / query-efficiency report and plots."""

    enabled: bool = True
    compare: tuple[str, ...] = ("random", "fixed")  # baselines under run/data/baselines/<name>/ (if present)
    encoder: str | None = None  # MiniLM dir; None = the packaged all-MiniLM-L6-v2; "none" = skip embeddings
    diversity_max: int = 256  # records sampled (seeded) for the pairwise-cosine diversity (MiniLM is the cost)
    seed: int = 0

    def validate(self) -> None:
        """Positive sizes."""
        if self.diversity_max < 2:
            raise ConfigError("diversity_max must be >= 2")


@dataclass(frozen=True)
class EvalConfig:
    """The eval stage. ``checkpoint`` "auto" = the SFT stage's export ``run/sft/hf``."""

    checkpoint: str = "auto"
    benchmarks: BenchmarkSection = field(default_factory=BenchmarkSection)
    mia: MIASection = field(default_factory=MIASection)
    report: ReportSection = field(default_factory=ReportSection)
