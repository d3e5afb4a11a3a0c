"""SFT stage: ``train(config, run_dir=None) -> TrainState`` and the pure ``make_train_step``.

``python -m teams_rl_jax.sft --config configs/sft_tiny.yaml --set optim.lr=1e-4``.
"""

from teams_rl_jax.sft.config import SFTConfig
from teams_rl_jax.sft.step import TrainState, make_optimizer, make_train_step, token_losses


def train(config, run_dir=None, log=print):
    """Run SFT (see :func:`teams_rl_jax.sft.loop.train`); imported lazily (Orbax, tensorboardX)."""
    from teams_rl_jax.sft.loop import train as _train

    return _train(config, run_dir, log)


def train_step(lm, optimizer, grad_accum: int = 1):
    """Alias of :func:`make_train_step`: returns the pure ``train_step(state, batch) -> (state, metrics)``."""
    return make_train_step(lm, optimizer, grad_accum)


__all__ = ["SFTConfig", "TrainState", "make_optimizer", "make_train_step", "token_losses", "train", "train_step"]
