"""SFT stage: ``train(config, run_dir=None) -> TrainState`` and the pure ``make_train_step``.

``python -m teams_rl_jax.sft --config configs/sft_tiny.yaml --set optim.lr=1e-4``.

On their own::

    optimizer = make_optimizer(cfg.optim, total_steps)
    step = jax.jit(make_train_step(lm, optimizer, grad_accum), donate_argnums=0)
    state = init_state(lm, optimizer, seed)
    state, metrics = step(state, batch)  # batch: int32 [B, T] input_ids, segment_ids, positions, loss_mask
"""

from teams_rl_jax.sft.config import SFTConfig
from teams_rl_jax.sft.step import (TrainState, init_state, learning_rate_schedule, make_optimizer, make_train_step,
                                   split_micro_batches, token_losses)


def train(config, run_dir=None, log=print):
    """Run SFT (see :func:`teams_rl_jax.sft.loop.train`); imported lazily (Orbax, tensorboardX)."""
    from teams_rl_jax.sft.loop import train as _train

    return _train(config, run_dir, log)


def run_sft_stage(config, run_dir, log=print):
    """The pipeline's SFT stage: :func:`train` into ``run_dir/sft``."""
    from teams_rl_jax.sft.loop import run_sft_stage as _run

    return _run(config, run_dir, log)


def train_step(lm, optimizer, grad_accum: int = 1):
    """Alias of :func:`make_train_step`: returns the pure ``train_step(state, batch) -> (state, metrics)``."""
    return make_train_step(lm, optimizer, grad_accum)


__all__ = ["SFTConfig", "TrainState", "init_state", "learning_rate_schedule", "make_optimizer", "make_train_step",
           "run_sft_stage", "split_micro_batches", "token_losses", "train", "train_step"]
