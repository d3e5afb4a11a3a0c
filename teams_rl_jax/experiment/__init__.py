"""``python -m teams_rl_jax.experiment``: the TeaMs-RL comparison in one command.

One shared policy stage, then four arms (``policy``, ``random``, ``fixed``, ``wizardlm``), each a run
dir under ``<exp>/arms/<name>/`` built with the pipeline's own generate, SFT and eval stages: generation
over member and non-member seeds (split once, seeded, recorded), SFT on the member records only, MIA
with the arm's non-member records as non-members. See ``runner`` and ``report``.
"""
