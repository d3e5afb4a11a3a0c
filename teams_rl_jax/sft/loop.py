"""The SFT loop: data, sharded jitted steps, Orbax checkpoints with exact resume, metrics, HF export.

Layout under ``run_dir/sft/``: ``ckpt/`` (Orbax: train state + data position), ``metrics.jsonl``,
``tb/`` (TensorBoard), ``tokenizer/`` (the run's tokenizer), ``model_config.json`` (the model's HF
config), ``hf/`` (final safetensors export, ``export_dtype``, ``export_shard_size`` shards, and its model
card ``README.md``: ``sft.model_card``) and, for
LoRA with ``lora.export`` adapter/both, ``adapter/`` (a PEFT adapter dir).

Resume: if ``ckpt/`` holds a checkpoint, the state and the data iterator's position are restored and
``metrics.jsonl`` is cut back to that step, so a killed run continues with exactly the batches (and,
on CPU, bit-identical losses) of an uninterrupted one, and no metric line is duplicated. The state is
restored straight into its shardings from Orbax: the HF weights are not read again (the model config
and tokenizer come from the run dir), so the original model dir may be gone.

LoRA (``lora.rank > 0``): the base (``model.dtype``) is frozen and lives in ``TrainState.frozen``; only
the adapters and their optimizer state are trained and checkpointed. Resuming a LoRA run re-reads the
frozen base from ``model.path`` (it is never written, so a checkpoint holds only the small adapters).

Metrics per step (``metrics.jsonl`` and TensorBoard, process 0 only): ``loss`` (mean cross-entropy
over the global batch's loss tokens), ``grad_norm`` (global, before clipping), ``lr``, ``tokens``
(non-padding tokens of the global batch), ``tokens_per_s`` (over the wall time since the previous
step, data and logging included), ``epoch``, and with ``peak_tflops`` set ``mfu`` =
6 * params * tokens_per_s / (peak_tflops * devices), the usual dense-transformer estimate
(attention FLOPs and padding not counted).

Multi-host: every process runs this same function (``jax.distributed`` already initialised); each
reads only its rows of every global batch, the global array is assembled with
``jax.make_array_from_process_local_data``, all processes take part in checkpointing and export, and
only process 0 logs and writes metrics.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Callable

import jax

from teams_rl_jax import sharding as shd
from teams_rl_jax.data import BatchIterator, read_dataset, tokenize_dataset
from teams_rl_jax.data.chat_sft import example_messages, resolve_chat_template
from teams_rl_jax.data.tokenizer import build_word_tokenizer, load_tokenizer
from teams_rl_jax.data.tokenize import prompt_text
from teams_rl_jax.errors import ConfigError, DataError, TrainingError
from teams_rl_jax.layout import RunLayout, SFTDir
from teams_rl_jax.models import LM, init, load_pretrained, read_hf_config, save_pretrained
from teams_rl_jax.models.lm import abstract_params, as_dtype
from teams_rl_jax.sft import lora as lora_lib
from teams_rl_jax.sft.config import SFTConfig
from teams_rl_jax.sft.model_card import sft_card
from teams_rl_jax.sft.step import (TrainState, init_state, learning_rate_schedule, make_optimizer, make_train_step,
                                   opt_state_shardings)

DEMO_DATA = Path(__file__).resolve().parent.parent / "data" / "demo_sft.jsonl"
# Test hook: SIGKILL this process right after the checkpoint of this step is committed.
FAULT_ENV = "TEAMS_RL_JAX_KILL_AFTER_CHECKPOINT"


def resolve_data_path(cfg: SFTConfig, run_dir: Path | None, log: Callable[[str], None]) -> str | Path:
    """``data.path``, or for ``auto`` the generate stage's ``run_dir/data/generated.jsonl``.

    The bundled demo set stands in only for the offline default (a randomly initialised tiny model,
    ``model.config``); fine-tuning a real checkpoint (``model.path``) on it would silently train a 7B
    model on 24 examples, so there a missing dataset is an error naming the file.
    """
    if cfg.data.path != "auto":
        return cfg.data.path  # kept a string: a gs:// TFDS path must not become a local Path
    generated = RunLayout(run_dir).data.records if run_dir is not None else None
    if generated is not None and generated.is_file():
        return generated
    if cfg.model.path is not None:
        where = generated if generated is not None else "run_dir/data/generated.jsonl (no run dir given)"
        raise DataError(f"data.path is 'auto' but the generate stage's dataset {where} does not exist: run the "
                        f"generate stage first, or set data.path to an Alpaca JSON/JSONL file")
    log(f"[sft] no generated dataset {generated}; using the bundled demo set {DEMO_DATA.name} "
        "(offline default only)")
    return DEMO_DATA


def build_model_and_tokenizer(cfg: SFTConfig, examples, out_dir: SFTDir | None, mesh, resume: bool = False):
    """Load (or randomly initialise) the LM in its shardings, and its tokenizer.

    ``resume``: the params will come from the Orbax checkpoint, so the returned LM holds abstract params
    (``ShapeDtypeStruct`` with shardings; nothing read or initialised), its config and tokenizer come
    from the run dir, and ``model.path`` is not touched. A LoRA run still needs its frozen base.
    """
    m = cfg.model
    saved_cfg = out_dir.model_config if out_dir is not None else None
    saved_tok = out_dir.tokenizer if out_dir is not None else None
    lean_resume = resume and saved_cfg.is_file() and (saved_tok / "tokenizer_config.json").is_file()
    if lean_resume:
        tok = load_tokenizer(saved_tok)
    elif m.path is not None or m.tokenizer is not None:
        tok = load_tokenizer(m.tokenizer or m.path)
    else:  # offline default: a word-level tokenizer built from the data (saved for the export)
        if cfg.data.template == "chat":  # the markers come from the chat template, the words from the data
            texts = [" ".join(msg["content"] for msg in example_messages(e)) for e in examples]
        else:
            texts = [prompt_text(e, cfg.data.template) + " " + e.output for e in examples]
        save = saved_tok if saved_tok is not None and jax.process_index() == 0 else None
        tok = build_word_tokenizer(texts, int(m.config.get("vocab_size", 4096)), save_dir=save)
    if lean_resume and not lora_lib.enabled(cfg.lora):
        config = read_hf_config(saved_cfg)
        lm = LM(config, abstract_params(config, m.dtype, mesh=mesh), dtype=as_dtype(m.compute_dtype or m.dtype),
                param_dtype=as_dtype(m.dtype))
    elif m.path is not None:
        lm = load_pretrained(m.path, dtype=m.dtype, compute_dtype=m.compute_dtype, mesh=mesh)
    else:
        lm = init(m.config, jax.random.key(cfg.seed), dtype=m.dtype, compute_dtype=m.compute_dtype, mesh=mesh)
    set_template = cfg.data.template == "chat" and not getattr(tok, "chat_template", None)
    if set_template:
        # the configured template becomes the tokenizer's, so the saved tokenizer and the export render alike
        tok.chat_template = resolve_chat_template(tok, cfg.data.chat_template)
    if len(tok) > lm.config.vocab_size:
        raise ConfigError(f"tokenizer has {len(tok)} tokens but the model's vocab_size is {lm.config.vocab_size}")
    if out_dir is not None and jax.process_index() == 0 and not lean_resume:
        # What a resume (or the export) needs besides the checkpoint: no trip back to model.path.
        saved_cfg.write_text(json.dumps(lm.config.to_hf(), indent=2) + "\n")
        if set_template or not (saved_tok / "tokenizer_config.json").is_file():
            tok.save_pretrained(str(saved_tok))
    # Runtime choices (not in config.json): attention kernel and layers per scan step.
    runtime = dataclasses.replace(lm.config, attention_impl=m.attention, scan_unroll=m.scan_unroll)
    lm = lm.replace(remat=m.remat, config=runtime)
    return (lm.replace(lora=cfg.lora) if lora_lib.enabled(cfg.lora) else lm), tok


class _Metrics:
    """JSONL + TensorBoard + progress bar, process 0 only."""

    def __init__(self, out_dir: SFTDir | None, total: int, start: int, tensorboard: bool):
        self.on = out_dir is not None and jax.process_index() == 0
        self.tb = self.bar = None
        if not self.on:
            return
        self.path = out_dir.metrics
        if self.path.exists():  # drop lines past the restored step (written before a crash)
            keep = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= start]
            self.path.write_text("".join(l + "\n" for l in keep))
        self.f = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(out_dir.tensorboard))
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, desc="sft", dynamic_ncols=True, disable=None)

    def write(self, row: dict) -> None:
        if not self.on:
            return
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"sft/{k}", v, row["step"])
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{row['loss']:.4f}")

    @property
    def bar_visible(self) -> bool:
        """Whether a progress bar is drawn (tqdm hides it when stderr is not a terminal)."""
        return self.bar is not None and not self.bar.disable

    def close(self) -> None:
        if self.on:
            self.f.close()
            self.bar.close()
            if self.tb is not None:
                self.tb.close()


def _checkpoint_manager(path: Path, cfg: SFTConfig):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.checkpoint.keep,
                                           enable_async_checkpointing=cfg.checkpoint.async_save)
    return ocp.CheckpointManager(path.resolve(), options=options)


def train(cfg: SFTConfig, run_dir: str | Path | None = None, log: Callable[[str], None] = print) -> TrainState:
    """Run SFT with ``cfg``; artifacts under ``run_dir/sft`` (none when ``run_dir`` is None). Returns the state."""
    import orbax.checkpoint as ocp

    cfg.validate()
    if jax.process_index() != 0:  # one process speaks for the run
        log = lambda msg: None  # noqa: E731
    run_dir = Path(run_dir) if run_dir is not None else None
    out = RunLayout(run_dir).sft if run_dir is not None else None
    if out is not None and jax.process_index() == 0:
        out.root.mkdir(parents=True, exist_ok=True)
    mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if (cfg.global_batch // cfg.grad_accum) % shards:  # every device gets whole rows of every micro-batch
        raise ConfigError(f"global_batch / grad_accum ({cfg.global_batch} / {cfg.grad_accum}) must be divisible "
                          f"by the mesh's data*fsdp ({shards})")

    data_path = resolve_data_path(cfg, run_dir, log)
    examples = read_dataset(data_path, cfg.data.format, split=cfg.data.tfds_split)
    mngr = _checkpoint_manager(out.ckpt, cfg) if out is not None else None
    resume_step = mngr.latest_step() if mngr is not None else None
    lm, tok = build_model_and_tokenizer(cfg, examples, out, mesh, resume=resume_step is not None)
    seqs, stats = tokenize_dataset(examples, tok, cfg.data.template, cfg.data.max_seq_len,
                                   cfg.data.min_response_tokens, cfg.data.chat_template)
    log(f"[sft] {data_path}: {stats.summary()}")
    d = cfg.data
    it = BatchIterator(seqs, global_batch=cfg.global_batch, seq_len=d.max_seq_len, pack=d.pack, seed=d.shuffle_seed,
                       pad_id=tok.pad_token_id or 0, process_index=jax.process_index(),
                       process_count=jax.process_count(), shuffle=d.shuffle, drop_remainder=d.drop_remainder,
                       pack_window=d.pack_window)
    total = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * it.steps_per_epoch(0)))

    optimizer = make_optimizer(cfg.optim, total)
    schedule = learning_rate_schedule(cfg.optim, total)
    rep = shd.replicated(mesh)
    use_lora = lora_lib.enabled(cfg.lora)
    frozen = frozen_shard = None
    n_params = lm.num_params()
    if use_lora:  # train {"lora": adapters}; the base rides along frozen (a jit argument, never saved)
        if cfg.lora.quantize == "nf4":  # QLoRA: the frozen base in 4 bits; the full-precision one is dropped
            frozen, frozen_shard = lora_lib.quantize_base(lm, cfg.lora, mesh)
            lm = lm.replace(params=None)
            log(f"[sft] base quantized to NF4 (block {cfg.lora.quant_block}): "
                f"{sum(x.nbytes for x in jax.tree_util.tree_leaves(frozen)) / 2**30:.2f} GiB on the devices")
        else:
            frozen, frozen_shard = lm.params, shd.param_shardings(lm, mesh)
        p_shard = lora_lib.shardings(lm, cfg.lora, mesh)
        if resume_step is not None:  # shapes only: the adapters come from the checkpoint
            trainable = jax.eval_shape(lambda: lora_lib.init_adapters(lm, cfg.lora, jax.random.key(0)))
        else:
            trainable = lora_lib.init_adapters(lm, cfg.lora, jax.random.key(cfg.seed + 1), mesh)
        log(f"[sft] LoRA rank {cfg.lora.rank} on {', '.join(cfg.lora.targets)}: "
            f"{lora_lib.num_params(trainable):,} trainable of {n_params:,} parameters")
    else:
        p_shard = shd.param_shardings(lm, mesh)
        trainable = lm.params
    o_shard = opt_state_shardings(optimizer, trainable, p_shard, rep)
    s_shard = TrainState(step=rep, params=p_shard, opt_state=o_shard, rng=rep, frozen=frozen_shard)
    start = 0
    if resume_step is not None:  # straight from Orbax into the shardings; no initial state is built
        start = resume_step
        rng_shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
        shapes = TrainState(step=jax.ShapeDtypeStruct((), jax.numpy.int32), params=trainable,
                            opt_state=jax.eval_shape(optimizer.init, trainable), rng=rng_shape)
        abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                          shapes, s_shard.replace(frozen=None))
        restored = mngr.restore(start, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                               data=ocp.args.JsonRestore()))
        state = restored["state"].replace(frozen=frozen)
        it.restore(restored["data"])
        log(f"[sft] resumed from step {start} (data position {restored['data']})")
    else:
        # Commit every leaf to its sharding: an uncommitted step counter or key would make the second
        # call (fed the first call's sharded outputs) trace and compile the step again.
        state = init_state(lm.replace(params=trainable), optimizer, cfg.seed, o_shard).replace(frozen=frozen)
        state = jax.device_put(state, s_shard)
    del frozen, trainable
    b_shard = shd.batch_sharding(mesh)
    with shd.activation_rules(mesh):
        step_fn = jax.jit(make_train_step(lm, optimizer, cfg.grad_accum, schedule, ce_chunk=cfg.ce_chunk),
                          in_shardings=(s_shard, b_shard),
                          out_shardings=(s_shard, rep), donate_argnums=0)

    # Training FLOPs per token: 6N for full fine-tuning; 4N with LoRA (forward 2N + the backward pass to
    # the activations 2N; the frozen base gets no weight gradient, the adapters' FLOPs are negligible).
    flops_per_token = (4 if use_lora else 6) * n_params
    metrics = _Metrics(out, total, start, cfg.tensorboard)
    kill_after = int(os.environ.get(FAULT_ENV, "0") or 0)
    t_last = time.perf_counter()
    try:
        for step in range(start + 1, total + 1):
            local = next(it)
            batch = {k: jax.make_array_from_process_local_data(b_shard, v) for k, v in local.items()}
            with shd.activation_rules(mesh):
                state, m = step_fn(state, batch)
            m = jax.device_get(m)
            if not bool(m["finite"]):
                raise TrainingError(f"non-finite loss or gradient at step {step} (loss={float(m['loss'])}, "
                                    f"grad_norm={float(m['grad_norm'])}); last good checkpoint kept in "
                                    f"{out.ckpt if out else '(no checkpoints)'}")
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            tokens = int(m["tokens"])
            row = {"step": step, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                   "lr": float(m["lr"]), "tokens": tokens, "tokens_per_s": tokens / dt,
                   "epoch": it.epoch}
            if cfg.peak_tflops:
                row["mfu"] = flops_per_token * tokens / dt / (cfg.peak_tflops * 1e12 * jax.device_count())
            metrics.write(row)
            if step % cfg.log_every == 0 and not metrics.bar_visible:
                log(f"[sft] step {step}/{total} loss {row['loss']:.4f} lr {row['lr']:.2e}")
            if mngr is not None and (step % cfg.checkpoint.every == 0 or step == total):
                mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state.replace(frozen=None)),
                                                        data=ocp.args.JsonSave(it.state())))
                if kill_after and step == kill_after:
                    mngr.wait_until_finished()
                    os.kill(os.getpid(), signal.SIGKILL)
    finally:
        metrics.close()
        if mngr is not None:
            mngr.wait_until_finished()
            mngr.close()

    if out is not None and cfg.export:
        export(cfg, lm, state, tok, out, log)
        if jax.process_index() == 0 and (out.hf / "config.json").is_file():  # LoRA export adapter: no hf/
            sft_card(cfg, data_path=data_path, steps=total, name=f"{run_dir.name}-sft").save(out.model_card)
    return state


def export(cfg: SFTConfig, lm, state: TrainState, tok, out: SFTDir, log: Callable[[str], None] = print) -> None:
    """Write ``out/hf`` (full or LoRA-merged weights, ``export_dtype``, ``export_shard_size`` shards) and, for
    LoRA with ``lora.export`` adapter/both, ``out/adapter`` (PEFT format), each with the tokenizer.

    ``export_dtype`` defaults to the compute dtype (bfloat16 for bf16 training, even with float32 master
    weights: what one serves); tensors are cast on the device and gathered one at a time.
    """
    m = cfg.model
    dtype = cfg.export_dtype or m.compute_dtype or m.dtype
    use_lora = lora_lib.enabled(cfg.lora)
    dirs = []
    if not use_lora or cfg.lora.export in ("merged", "both"):
        params = {**state.frozen, **state.params} if use_lora else state.params
        save_pretrained(lm, out.hf, params=params, dtype=dtype, max_shard_size=cfg.export_shard_size)
        dirs.append(out.hf)
    if use_lora and cfg.lora.export in ("adapter", "both"):
        lora_lib.save_peft_adapter(lm, state.params, out.adapter, base_model=m.path)
        dirs.append(out.adapter)
    if jax.process_index() == 0:
        for d in dirs:
            tok.save_pretrained(str(d))
    log(f"[sft] exported {', '.join(str(d) for d in dirs)} ({dtype})")


def run_sft_stage(cfg: SFTConfig, run_dir: str | Path, log: Callable[[str], None] = print) -> TrainState:
    """The pipeline's SFT stage (same as :func:`train` with a run directory)."""
    return train(cfg, run_dir, log)

