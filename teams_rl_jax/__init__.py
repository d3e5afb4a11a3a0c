"""teams-rl-jax: JAX-native TeaMs-RL (RL-taught instruction evolution, then one SFT step).

Stages: ``env``/``rl`` (policy), generate, ``sft``, ``eval``; shared pieces in ``models``,
``data``, ``sharding``. ``teams_rl_jax.generate`` is the KV-cache sampler of ``generation``.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import teams_rl_jax` stays cheap (no jax import) for the CLI's --help.
    if name == "generate":
        from teams_rl_jax.generation import generate

        return generate
    raise AttributeError(f"module 'teams_rl_jax' has no attribute {name!r}")
