"""Packaged configs: ``default.yaml`` is what ``python -m teams_rl_jax.train`` runs with no ``--config``."""
