"""An OpenAI-compatible server over a local checkpoint: ``python -m teams_rl_jax.serve --checkpoint DIR``.

Serves ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` with FastAPI on uvicorn;
concurrent requests are batched into one jitted generate (``serve.batcher``). Binds 127.0.0.1
unless ``--host`` says otherwise; ``--api-key-env NAME`` turns on bearer-token auth with the key
held in that environment variable. Any client (``openai``, the ``openai`` backend of this package,
lm-eval's ``local-completions``) can then use a Flax model as instructor, reviewer or expert.
"""

from teams_rl_jax.serve.app import Limits, make_app

__all__ = ["Limits", "make_app"]
