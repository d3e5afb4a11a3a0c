"""teams_rl_jax.data."""
