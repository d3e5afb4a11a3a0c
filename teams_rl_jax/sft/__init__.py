"""teams_rl_jax.sft."""
