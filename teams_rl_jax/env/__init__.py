"""teams_rl_jax.env."""
