"""teams_rl_jax.eval."""
