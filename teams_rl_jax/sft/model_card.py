"""The SFT export's model card, ``run/sft/hf/README.md`` (``layout.SFTDir.model_card``).

The SFT stage writes it after the export (:func:`sft_card`): base model, dataset (its path and, for a
generate stage's ``generated.jsonl``, its dataset card), the SFT settings, LoRA or full fine-tuning, and
an ``Evaluation`` section that the eval stage fills (:func:`with_eval`: benchmark accuracies as the
card's ``model-index`` eval results, membership inference in the text).

The card is outside the export's digest (``stages.artifact_files``: config.json + safetensors + index
only), so writing or updating it never makes a later stage stale.
"""

from __future__ import annotations

from pathlib import Path

from teams_rl_jax.layout import GenerateDir
from teams_rl_jax.sft import lora as lora_lib
from teams_rl_jax.sft.config import SFTConfig

EVAL_HEADING = "## Evaluation"
NOT_EVALUATED = "Not evaluated yet: the eval stage (`--stages eval`) adds its results here.\n"


def dataset_card_of(data_path: str | Path) -> Path | None:
    """The dataset card next to a generate output dir's records (None: another dataset, or no card)."""
    p = Path(data_path)
    card = GenerateDir(p.parent).hf.card
    return card if GenerateDir(p.parent).records == p and card.is_file() else None


def _settings(cfg: SFTConfig, steps: int) -> str:
    o, d, lo = cfg.optim, cfg.data, cfg.lora
    how = (f"LoRA rank {lo.rank}, alpha {lo.alpha}, dropout {lo.dropout}, targets {', '.join(lo.targets)}"
           f"{', NF4 base (QLoRA)' if lo.quantize == 'nf4' else ''}; export {lo.export} (this dir: merged weights)"
           if lora_lib.enabled(lo) else "full fine-tuning")
    length = f"max_steps {cfg.max_steps}" if cfg.max_steps is not None else f"{cfg.epochs} epochs"
    dtype = cfg.model.compute_dtype or cfg.model.dtype
    return "\n".join([
        f"- method: {how}",
        f"- optimizer: AdamW, lr {o.lr}, {o.schedule} schedule, warm-up {o.warmup_steps} steps, "
        f"weight decay {o.weight_decay}, clip norm {o.clip_norm}",
        f"- steps: {steps} ({length})",
        f"- batch: {cfg.global_batch} sequences per step in {cfg.grad_accum} micro-batch(es); max sequence length "
        f"{d.max_seq_len} tokens; packing {d.pack}; template `{d.template}`",
        f"- dtypes: params {cfg.model.dtype}, compute {dtype}, export {cfg.export_dtype or dtype}; seed {cfg.seed}"])


def sft_card(cfg: SFTConfig, *, data_path: str | Path, steps: int, name: str):
    """The :class:`huggingface_hub.ModelCard` of an SFT export (not evaluated yet; no license: the user's)."""
    from huggingface_hub import ModelCard, ModelCardData

    base = (f"`{cfg.model.path}` (a local checkpoint dir: add its Hub id as `base_model:` before publishing)"
            if cfg.model.path else "none: a random initialisation (`sft.model.config`), the offline demo")
    card = dataset_card_of(data_path)
    dataset = f"`{data_path}`" + (f", dataset card `{card}`" if card else "")
    tags = ["teams-rl-jax", "sft"] + (["lora"] if lora_lib.enabled(cfg.lora) else [])
    data = ModelCardData(model_name=name, library_name="transformers", pipeline_tag="text-generation", tags=tags)
    body = f"""# {name}

A causal LM fine-tuned on instruction data by the SFT stage of teams-rl-jax (TeaMs-RL), exported as
Hugging Face safetensors.

- base model: {base}
- dataset: {dataset}

## SFT settings

{_settings(cfg, steps)}

## License

Not set: it follows the base model's license and the dataset's. Add `license:` to the YAML above.

{EVAL_HEADING}

{NOT_EVALUATED}"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _eval_results(report: dict) -> list:
    from huggingface_hub import EvalResult

    return [EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task, metric_type=metric,
                       metric_value=round(float(r[metric]), 6), metric_name=f"{metric} (n={r.get('n')})")
            for task, r in sorted((report.get("benchmarks") or {}).items())
            for metric in ("acc", "acc_norm") if r.get(metric) is not None]


def _eval_text(report: dict) -> str:
    lines = [f"- {task}: " + ", ".join(f"{k} {r[k]:.4f}" for k in ("acc", "acc_norm") if r.get(k) is not None)
             + f" (n={r.get('n')})" for task, r in sorted((report.get("benchmarks") or {}).items())]
    mia = report.get("mia") or {}
    for attack in ("loss", "reference"):
        if attack in mia:
            m = mia[attack]
            lines.append(f"- membership inference ({attack} attack, on this model's training set): AUC {m['auc']:.3f}, "
                         f"TPR@1%FPR {m['tpr_at_1pct_fpr']:.3f} ({m['members']} members, {m['non_members']} non-members)")
    return "From the eval stage (`eval/report.md`):\n\n" + ("\n".join(lines) if lines else "no results (see its notes)") + "\n"


def with_eval(card, report: dict):
    """``card`` with the eval stage's ``report`` (``eval/report.json``): eval results and the text section,
    replacing an earlier evaluation (a redone eval stage)."""
    from huggingface_hub import ModelCard

    data = card.data
    results = _eval_results(report)
    data.eval_results = results or None
    if not data.model_name:
        data.model_name = "model"
    head, _, rest = card.text.partition(EVAL_HEADING)
    tail = rest.split("\n## ", 1)[1] if "\n## " in rest else ""
    text = f"{head}{EVAL_HEADING}\n\n{_eval_text(report)}" + (f"\n## {tail}" if tail else "")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text.lstrip()}")


def update_card_with_eval(path: Path, report: dict) -> bool:
    """Add ``report`` to the card at ``path`` (False: no card there, nothing written)."""
    from huggingface_hub import ModelCard

    if not path.is_file():
        return False
    with_eval(ModelCard.load(path), report).save(path)
    return True
