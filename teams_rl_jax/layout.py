"""The run directory, written down once (as MaxText's ``base.yml`` does for its outputs).

Every stage and CLI takes its paths from :class:`RunLayout`; no other module spells a run-dir path.

    run_dir/
      config.yaml                 the resolved config (secrets redacted)
      .stages/<stage>.json        stage markers: fingerprint of what the outputs depend on + artifact digests
      cache/responses.sqlite      every paid LLM answer (shared by every stage, arm and rerun); with several
                                  workers / processes, responses.<worker>.sqlite each (response_cache_file;
                                  the dir is generate.cache_dir when set)
      cache/batches/<sha256>.json Batch API jobs in flight (openai_batch roles), keyed by request file
      models/tiny-expert/         the offline demo's tiny random expert
      policy/                     policy.json, checkpoint/ (Orbax), curves*.jsonl/png, op_histogram.*, summary.json,
                                  state*/ (resumable runner states)
      data/                       generated.jsonl, summary.json, trace.jsonl (every step, kept or not), shards/,
                                  baselines/<name>/ (same shape as data/),
                                  hf/ (the records as a Hugging Face dataset: data/*.parquet + README.md card)
      sft/                        ckpt/ (Orbax), hf/ (HF export + README.md model card), adapter/ (PEFT),
                                  metrics.jsonl, tb/, tokenizer/, model_config.json
      eval/                       report.md, report.json, *.png, benchmarks_per_doc.json, browse.html (dataset browser)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STAGES = ("policy", "generate", "sft", "eval")


def response_cache_file(cache_dir: str | Path, worker: int | None = None) -> Path:
    """The response cache file a process writes: ``responses.sqlite`` for a single-process run,
    ``responses.<worker>.sqlite`` for worker ``worker`` of several (each reads the others' files)."""
    return Path(cache_dir) / ("responses.sqlite" if worker is None else f"responses.{worker:05d}.sqlite")


@dataclass(frozen=True)
class HFDatasetDir:
    """A generate output dir's records as a Hugging Face dataset dir (``datasets.load_dataset(root)``)."""

    root: Path

    @property
    def card(self) -> Path:
        return self.root / "README.md"

    def shard(self, index: int, count: int, split: str = "train") -> Path:
        return self.root / "data" / f"{split}-{index:05d}-of-{count:05d}.parquet"

    @staticmethod
    def data_files(split: str = "train") -> str:
        """The card's ``configs`` glob of ``split``'s shards (relative to ``root``)."""
        return f"data/{split}-*"


@dataclass(frozen=True)
class GenerateDir:
    """One generate output dir (``data/`` or ``data/baselines/<name>/``)."""

    root: Path

    @property
    def records(self) -> Path:
        return self.root / "generated.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def decontamination(self) -> Path:
        return self.root / "decontamination.json"

    @property
    def trace(self) -> Path:
        """Every evolution step, kept or eliminated (one JSON line each; merged from the shards)."""
        return self.root / "trace.jsonl"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    def shard_records(self, proc: int) -> Path:
        return self.shards / f"generated.{proc:05d}.jsonl"

    def shard_progress(self, proc: int) -> Path:
        return self.shards / f"progress.{proc:05d}.jsonl"

    def shard_trace(self, proc: int) -> Path:
        return self.shards / f"trace.{proc:05d}.jsonl"

    def shard_done(self, proc: int) -> Path:
        """Worker ``proc`` finished its seeds (``generate.worker`` mode): ``{"worker", "count"}``."""
        return self.shards / f"done.{proc:05d}.json"

    @property
    def merge_lock(self) -> Path:
        """Held (flock) by the worker that merges, so two workers finishing together merge one at a time."""
        return self.shards / "merge.lock"

    @property
    def baselines(self) -> Path:
        return self.root / "baselines"

    @property
    def hf(self) -> HFDatasetDir:
        return HFDatasetDir(self.root / "hf")

    def baseline(self, name: str) -> "GenerateDir":
        return GenerateDir(self.baselines / name)


@dataclass(frozen=True)
class PolicyDir:
    """The policy stage's output dir."""

    root: Path

    @property
    def meta(self) -> Path:
        return self.root / "policy.json"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    def curves(self, name: str | None = None) -> Path:
        return self.root / ("curves.jsonl" if name is None else f"curves_{name}.jsonl")

    @property
    def curves_png(self) -> Path:
        return self.root / "curves.png"

    @property
    def op_histogram(self) -> Path:
        return self.root / "op_histogram.json"

    @property
    def op_histogram_png(self) -> Path:
        return self.root / "op_histogram.png"

    def state(self, name: str | None = None) -> Path:
        """The resumable runner state of the policy (or of baseline ``name``)."""
        return self.root / ("state" if name is None else f"state_{name}")


@dataclass(frozen=True)
class SFTDir:
    """The SFT stage's output dir."""

    root: Path

    @property
    def ckpt(self) -> Path:
        return self.root / "ckpt"

    @property
    def hf(self) -> Path:
        return self.root / "hf"

    @property
    def model_card(self) -> Path:
        """The export's model card (outside the export's digest: ``stages.artifact_files``)."""
        return self.hf / "README.md"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def model_config(self) -> Path:
        return self.root / "model_config.json"


@dataclass(frozen=True)
class EvalDir:
    """The eval stage's output dir."""

    root: Path

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def benchmarks_per_doc(self) -> Path:
        return self.root / "benchmarks_per_doc.json"

    @property
    def browse(self) -> Path:
        """The dataset browser: one self-contained HTML page over ``data/trace.jsonl``."""
        return self.root / "browse.html"


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run directory."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def marker(self, stage: str) -> Path:
        return self.root / ".stages" / f"{stage}.json"

    @property
    def cache_dir(self) -> Path:
        """The default response cache dir (``generate.cache_dir`` moves the generate stage's)."""
        return self.root / "cache"

    @property
    def cache(self) -> Path:
        """The single-process response cache file."""
        return response_cache_file(self.cache_dir)

    @property
    def batch_state(self) -> Path:
        """Where ``openai_batch`` roles record their batches in flight (re-attached to on rerun)."""
        return self.root / "cache" / "batches"

    @property
    def tiny_expert(self) -> Path:
        return self.root / "models" / "tiny-expert"

    @property
    def policy(self) -> PolicyDir:
        return PolicyDir(self.root / "policy")

    @property
    def data(self) -> GenerateDir:
        return GenerateDir(self.root / "data")

    @property
    def sft(self) -> SFTDir:
        return SFTDir(self.root / "sft")

    @property
    def eval(self) -> EvalDir:
        return EvalDir(self.root / "eval")

    def stage_dir(self, stage: str) -> Path:
        """The directory a stage owns (what ``--force`` removes before redoing it)."""
        return {"policy": self.policy.root, "generate": self.data.root, "sft": self.sft.root,
                "eval": self.eval.root}[stage]
