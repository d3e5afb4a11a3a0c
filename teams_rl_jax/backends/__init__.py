"""LLM backends for every role (instructor, reviewer, expert): one protocol, two implementations.

* :class:`FlaxBackend` (``backend: flax``): a local Hugging Face checkpoint dir run in-process,
  batched jitted generation (left-padded, bucketed prompt lengths), sharded over a mesh.
* :class:`OpenAIBackend` (``backend: openai``): any OpenAI-compatible endpoint (vLLM, TGI, our own
  ``python -m teams_rl_jax.serve``, a hosted API) through the official ``openai`` client, with
  bounded concurrency, timeouts and counted retries.
* :class:`OpenAIBatchBackend` (``backend: openai_batch``): the same endpoint's Batch API, one batch
  per ``complete`` call, resumable (generate-stage roles only: it needs a ``state_dir``).

Usage::

    from teams_rl_jax.backends import build, QueryCounter
    from teams_rl_jax.backends.config import RoleConfig
    counter = QueryCounter()
    instructor = build(RoleConfig(backend="flax", checkpoint="/models/vicuna-7b"), "instructor", counter)
    out = instructor.complete([[{"role": "user", "content": "Rewrite: ..."}]], max_new_tokens=256)
    out[0].text, out[0].finish_reason, counter.snapshot()  # {"instructor": 1}
"""

from __future__ import annotations

from teams_rl_jax.backends.base import Backend, Completion, QueryCounter
from teams_rl_jax.backends.config import RoleConfig, RolesConfig

__all__ = ["Backend", "Completion", "FlaxBackend", "OpenAIBackend", "OpenAIBatchBackend", "QueryCounter", "RoleConfig", "RolesConfig",
           "build", "build_roles"]


def build(cfg: RoleConfig, role: str, counter: QueryCounter | None = None, *, cache=None,
          state_dir=None) -> Backend:
    """The backend ``cfg`` describes, counting its queries as ``role`` on ``counter``.

    ``cache``: optional; a callable ``cache(backend) -> Backend`` that wraps the backend (e.g. the
    generate stage's completion cache), applied last so cached answers cost no query.
    ``state_dir``: where ``openai_batch`` records its batches in flight (the generate stage passes
    ``RunLayout.batch_state``); without it ``openai_batch`` is a ConfigError.
    """
    cfg.validate()
    counter = counter if counter is not None else QueryCounter()
    if cfg.backend == "flax":
        from teams_rl_jax.backends.flax_backend import FlaxBackend

        backend = FlaxBackend.from_config(cfg, role=role, counter=counter)
    elif cfg.backend == "openai_batch":
        from teams_rl_jax.backends.openai_batch import OpenAIBatchBackend

        backend = OpenAIBatchBackend.from_config(cfg, role=role, counter=counter, state_dir=state_dir)
    else:
        from teams_rl_jax.backends.openai_backend import OpenAIBackend
        backend = OpenAIBackend.from_config(cfg, role=role, counter=counter)
    return cache(backend) if cache is not None else backend


def build_roles(roles: RolesConfig, counter: QueryCounter | None = None, *, cache=None,
                state_dir=None) -> dict[str, Backend]:
    """A backend for every configured role, sharing one counter; two roles with the same flax
    checkpoint, dtype and mesh share one loaded model (a 7B model is not loaded twice)."""
    from teams_rl_jax.backends.flax_backend import FlaxBackend

    counter = counter if counter is not None else QueryCounter()
    out: dict[str, Backend] = {}
    loaded: dict[tuple, FlaxBackend] = {}
    for role in ("instructor", "reviewer", "expert"):
        cfg = getattr(roles, role)
        if cfg is None:
            continue
        if cfg.backend == "flax":
            cfg.validate()
            key = (cfg.checkpoint, cfg.dtype, tuple(sorted((cfg.mesh or {}).items())))
            if key in loaded:
                first = loaded[key]
                backend = FlaxBackend.from_lm(first.lm, first.tokenizer, role=role, counter=counter,
                                              model=cfg.model or first.model, max_batch=cfg.max_batch,
                                              chat=cfg.chat, mesh=first.mesh, eos_ids=first.eos_ids)
            else:
                backend = loaded[key] = FlaxBackend.from_config(cfg, role=role, counter=counter)
            out[role] = cache(backend) if cache is not None else backend
        else:
            out[role] = build(cfg, role, counter, cache=cache, state_dir=state_dir)
    return out


def __getattr__(name):
    # Lazy: importing the package (e.g. for RoleConfig) must not import jax or the openai client.
    if name == "FlaxBackend":
        from teams_rl_jax.backends.flax_backend import FlaxBackend
        return FlaxBackend
    if name == "OpenAIBatchBackend":
        from teams_rl_jax.backends.openai_batch import OpenAIBatchBackend
        return OpenAIBatchBackend
    if name == "OpenAIBackend":
        from teams_rl_jax.backends.openai_backend import OpenAIBackend
        return OpenAIBackend
    raise AttributeError(name)
