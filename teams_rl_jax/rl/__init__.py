"""teams_rl_jax.rl."""
