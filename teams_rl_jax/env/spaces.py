"""Action and observation spaces of the env (gymnax's ``environments/spaces.py``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Discrete:
    """gymnax's ``Discrete`` space: actions ``0 .. n-1``."""

    n: int
    dtype: Any = jnp.int32

    @property
    def shape(self) -> tuple[int, ...]:
        return ()

    def sample(self, key: jax.Array) -> jax.Array:
        """A uniform action."""
        return jax.random.randint(key, (), 0, self.n).astype(self.dtype)

    def contains(self, x: jax.Array) -> jax.Array:
        """Whether ``x`` is a valid action."""
        return (x >= 0) & (x < self.n)


@dataclasses.dataclass(frozen=True)
class Box:
    """gymnax's ``Box`` space: real vectors of ``shape`` in ``[low, high]``."""

    low: float
    high: float
    shape: tuple[int, ...]
    dtype: Any = jnp.float32

    def sample(self, key: jax.Array) -> jax.Array:
        """A uniform sample (standard normal where the box is unbounded)."""
        if jnp.isfinite(self.low) and jnp.isfinite(self.high):
            return jax.random.uniform(key, self.shape, self.dtype, self.low, self.high)
        return jax.random.normal(key, self.shape, self.dtype)

    def contains(self, x: jax.Array) -> jax.Array:
        """Whether ``x`` lies in the box."""
        return jnp.all((x >= self.low) & (x <= self.high))
