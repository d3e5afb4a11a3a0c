"""``GenerateConfig``: the generate stage's settings (the ``generate:`` section of the pipeline YAML)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from teams_rl_jax.errors import ConfigError
from teams_rl_jax.rl.config import validate_schedule

SELECTORS = ("policy", "random", "fixed")
PROTOCOLS = ("filtered", "paper", "wizardlm")
# Renamed in issue 18: the old ``selector: paper`` was a fixed schedule, not the paper's method.
RENAMED = {"paper": "selector: fixed with schedule: [paper] (the reference generator's fixed schedule); the "
                    "paper's generation is generate.protocol: paper"}


def _check_selector(key: str, name: str) -> None:
    if name in RENAMED:
        raise ConfigError(f"{key}: {name!r} was renamed: use {RENAMED[name]}")


@dataclass(frozen=True)
class GenerateConfig:
    """Which seeds, who picks the operations, who carries them out, what is kept, and the budgets.

    ``selector``: ``policy`` (the policy stage's ``run/policy`` checkpoint), ``random`` (WizardLM's
    Evol-Instruct: uniform over the operations), ``fixed`` (``schedule``: op names, or a named schedule
    such as ``[paper]``, the reference generator's forced schedule). ``protocol``: ``filtered`` (ours:
    reviewer, elimination rules, de-duplication), ``paper`` (the reference generator: the selector's
    choice with its overrides and add_constraints bias, no reviewer, every step kept, one answer each)
    or ``wizardlm`` (WizardLM's Evol-Instruct: ``rounds`` rounds over every seed, one uniformly random
    operation per round, its elimination rules; needs ``selector: random``). ``operator_role``: the LLM role that rewrites (``instructor``,
    or ``expert`` as in the paper's single-model setting), or ``token_edit`` for the LLM-free
    token-edit operator of the env (the offline default). ``baselines``: selectors also run over the
    same seeds with the same query budget, into ``run/data/baselines/<name>/``.
    """

    # The seed file is the pipeline's top-level ``seeds`` key (both stages read it); at most this many here.
    MOVED_KEYS = {"seeds": "the top-level 'seeds' key (one seed file for the policy and generate stages)"}
    max_seeds: int | None = None
    # "paper" is accepted by the loader only so that validate() can say what it was renamed to.
    selector: Literal["policy", "random", "fixed", "paper"] = "policy"
    schedule: tuple[str, ...] = ("add_constraints",)  # for selector: fixed (last op repeats; or [paper])
    protocol: Literal["filtered", "paper", "wizardlm"] = "filtered"
    # protocol paper: added to the add_constraints logit before a sampling selector (policy, random)
    # draws: the categorical analogue of the reference's +0.7 on its Gaussian sample (docs/design.md).
    add_constraints_bias: float = 0.7
    rounds: int = 4  # protocol wizardlm: evolution rounds over every seed (WizardLM's M)
    policy_dir: str | None = None  # default: run_dir/policy
    greedy: bool = False  # policy: argmax instead of sampling
    steps: int = 6  # the paper's six evolutions per seed
    keep: Literal["all", "final"] = "all"  # every step's instruction (paper) or only the last
    operator_role: Literal["instructor", "expert", "token_edit"] = "instructor"
    judge: bool = True  # ask the reviewer (when configured) "Equal"/"Not Equal" for rule 1
    near_dup_threshold: float | None = 0.95  # MiniLM cosine at or above it = near-duplicate; null = off
    encoder: str | None = None  # local HF BERT dir; None = the packaged all-MiniLM-L6-v2
    # Reply lengths are the roles' own (roles.<role>.max_new_tokens): a rewrite cut by it is
    # eliminated as truncated unless drop_truncated is false.
    drop_truncated: bool = True
    temperature: float = 0.7
    top_p: float = 0.95
    batch_seeds: int = 32  # seeds evolved together: one batched call per role per step
    max_queries: int | None = None  # stop starting new batches once this many queries were made
    baselines: tuple[str, ...] = ("random",)
    cache: bool = True  # SQLite response cache under run_dir/cache (or cache_dir)
    # Where the response cache lives (null: run_dir/cache). Several workers each write their own
    # responses.<worker>.sqlite there and read all of them (teams_rl_jax.backends.cache).
    cache_dir: str | None = None
    # Worker mode (no jax.distributed; for HTTP roles on a SLURM array): "I/N" = worker I of N (seed i
    # belongs to worker i % N), "slurm" = I/N from SLURM_ARRAY_TASK_ID/_MIN/_COUNT, "merge" = only merge the
    # finished workers' shards. The worker that finishes last merges (docs/design.md, "Past one machine").
    worker: str | None = None
    # Benchmark decontamination of the merged records (issue 20; teams_rl_jax.eval.decontaminate):
    # off | report (write decontamination.json, count in summary.json) | drop (also remove the
    # contaminated records from generated.jsonl, before SFT). The benchmarks are read from
    # decontaminate_benchmarks_dir (eval.tasks layouts), this stage's own key: no other stage's config.
    decontaminate: Literal["off", "report", "drop"] = "off"
    decontaminate_benchmarks_dir: str | None = None
    decontaminate_n: int = 13  # words per n-gram (lm-eval's 13)
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        """Ranges and names."""
        _check_selector("selector", self.selector)
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol: unknown {self.protocol!r} (valid: {', '.join(PROTOCOLS)})")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if self.protocol == "wizardlm" and (self.selector != "random" or set(self.baselines) - {"random"}):
            raise ConfigError("protocol: wizardlm picks one operation uniformly at random per round: "
                              f"set selector: random and no other baselines (got selector {self.selector!r}, "
                              f"baselines {list(self.baselines)})")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.batch_seeds < 1:
            raise ConfigError(f"batch_seeds must be >= 1, got {self.batch_seeds}")
        if self.max_seeds is not None and self.max_seeds < 1:
            raise ConfigError(f"max_seeds must be >= 1, got {self.max_seeds}")
        if self.near_dup_threshold is not None and not 0.0 < self.near_dup_threshold <= 1.0:
            raise ConfigError(f"near_dup_threshold must be in (0, 1] or null, got {self.near_dup_threshold}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("need temperature >= 0 and 0 < top_p <= 1")
        for b in self.baselines:
            _check_selector("baselines", b)
            if b not in SELECTORS or b == "policy":
                raise ConfigError(f"baselines: unknown baseline {b!r} (valid: random, fixed)")
        if self.selector == "fixed" or "fixed" in self.baselines:
            validate_schedule(self.schedule, "schedule")
        self._validate_decontaminate()
        if self.worker is not None:
            worker_spec(self.worker, {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "1"})

    def _validate_decontaminate(self) -> None:
        if self.decontaminate not in ("off", "report", "drop"):
            raise ConfigError(f"decontaminate: unknown {self.decontaminate!r} (valid: off, report, drop)")
        if self.decontaminate != "off" and not self.decontaminate_benchmarks_dir:
            raise ConfigError(f"decontaminate_benchmarks_dir: needed with decontaminate: {self.decontaminate} "
                              "(a local benchmark dir, as eval.benchmarks.data_dir)")
        if self.decontaminate_n < 1:
            raise ConfigError(f"decontaminate_n must be >= 1, got {self.decontaminate_n}")


def worker_spec(spec: str, env) -> tuple[int, int] | None:
    """``generate.worker`` as ``(index, count)``; None for ``merge``. ``slurm`` reads the array's env."""
    spec = str(spec).strip()
    if spec == "merge":
        return None
    if spec == "slurm":
        try:
            i = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            n = int(env["SLURM_ARRAY_TASK_COUNT"])
        except (KeyError, ValueError):
            raise ConfigError("generate.worker: 'slurm' needs SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT "
                              "(run it as a job array, e.g. sbatch --array=0-3)") from None
    else:
        a, sep, b = spec.partition("/")
        try:
            i, n = int(a), int(b)
        except ValueError:
            i, n, sep = -1, 0, ""
        if not sep:
            raise ConfigError(f"generate.worker: expected I/N (worker I of N), slurm or merge, got {spec!r}")
    if not 0 <= i < n:
        raise ConfigError(f"generate.worker: need 0 <= I < N, got worker {i} of {n}")
    return i, n
