"""teams_rl_jax.backends."""
