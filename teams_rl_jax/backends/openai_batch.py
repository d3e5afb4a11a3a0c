"""A role answered through OpenAI's Batch API (``backend: openai_batch``): half the price, hours of latency.

One ``complete(prompts)`` call is one batch:

1. The requests are written as JSONL, one line per distinct request body, ``custom_id`` = sha256 of
   the body (stable: the same request always has the same id; duplicates inside a call share a line).
2. State first: the file's sha256 keys a small state file ``<state_dir>/<sha256>.json``. If it names
   a batch (an earlier run died while it was in flight), that batch is re-attached to, not paid
   again. Otherwise the file is uploaded (``files.create(purpose="batch")``; its id recorded), the
   batch created (``batches.create``; its id recorded before any polling), then
3. ``batches.retrieve`` is polled every ``batch_poll_s`` until it ends or ``batch_timeout_s`` passes (a
   ``BackendError`` that leaves the state file: rerunning re-attaches). The output and error files
   are downloaded (``files.content``) and mapped back by custom_id.
4. Lines that failed (an error line, or no line) are resubmitted as a new, smaller batch, at most
   ``max_retries`` times; a line failing every attempt is one ``BackendError`` naming its custom_id
   and the server's error. The state file is removed once the batch's answers are read.

Queries are counted per prompt, as the live backend does. The key comes from ``api_key_env`` and
lives only in the client (the parent class's rule); the state file holds ids and counts, nothing
else. Only the generate stage hands a backend a ``state_dir`` (``RunLayout.batch_state``): a role
whose answers are needed one step at a time (the policy stage's env) cannot be ``openai_batch``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from teams_rl_jax.backends.base import Completion, Prompt, QueryCounter
from teams_rl_jax.backends.openai_backend import OpenAIBackend, api_key
from teams_rl_jax.errors import BackendError, ConfigError

log = logging.getLogger(__name__)

TERMINAL = ("completed", "failed", "cancelled", "expired")


def custom_id(body: dict) -> str:
    """sha256 (hex, 32 chars) of the request body's canonical JSON."""
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def _write_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


class OpenAIBatchBackend(OpenAIBackend):
    """``Backend`` over an endpoint's Batch API (see the module docstring); HTTP calls are retried as
    the live backend retries them (``_with_retries``)."""

    kind = "openai_batch"

    def __init__(self, *, state_dir: str | Path, poll_s: float = 10.0, batch_timeout_s: float = 86400.0, **kw):
        super().__init__(**kw)
        self.state_dir = Path(state_dir)
        self.poll_s = float(poll_s)
        self.batch_timeout_s = float(batch_timeout_s)

    @classmethod
    def from_config(cls, cfg, *, role: str, counter: QueryCounter | None = None,
                    state_dir: str | Path | None = None) -> OpenAIBatchBackend:
        if state_dir is None:
            raise ConfigError(f"roles.{role}.backend: openai_batch answers in batches, for the generate stage only "
                              f"(the policy stage's env needs answers step by step: use openai)")
        return cls(base_url=cfg.base_url, model=cfg.model, role=role, counter=counter, api_key=api_key(cfg, role),
                   chat=cfg.chat, max_concurrency=1, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, backoff_s=cfg.backoff_s,
                   max_backoff_s=cfg.max_backoff_s, state_dir=state_dir, poll_s=cfg.batch_poll_s,
                   batch_timeout_s=cfg.batch_timeout_s)

    def __repr__(self) -> str:
        return f"OpenAIBatchBackend(role={self.role!r}, model={self.model!r}, host={self.host!r})"

    __str__ = __repr__

    # ---- one call -------------------------------------------------------------------------------
    def _body(self, prompt: Prompt, kw: dict) -> dict:
        if self.chat:
            return {"model": self.model, "messages": self._messages(prompt), **kw}
        return {"model": self.model, "prompt": self._text(prompt), **kw}

    def complete(self, prompts: Sequence[Prompt], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, stop: Sequence[str] | None = None, seed: int | None = None
                 ) -> list[Completion]:
        """One completion per prompt through one batch (plus retry batches); counts ``len(prompts)`` queries."""
        prompts = list(prompts)
        self.counter.add(self.role, len(prompts))
        if not prompts:
            return []
        kw: dict = {"max_tokens": int(max_new_tokens), "temperature": float(temperature), "top_p": float(top_p)}
        if stop:
            kw["stop"] = list(stop)
        if seed is not None:
            kw["seed"] = int(seed)
        bodies = [self._body(p, kw) for p in prompts]
        ids = [custom_id(b) for b in bodies]
        todo = dict(zip(ids, bodies))
        got: dict[str, dict] = {}
        errors: dict[str, str] = {}
        for attempt in range(self.max_retries + 1):
            pending = {c: b for c, b in todo.items() if c not in got}
            if not pending:
                break
            if attempt:
                with self._lock:
                    self.retries += 1
                log.warning("%s: %d of %d batch lines failed; resubmitting them (retry %d/%d)", self.role,
                            len(pending), len(todo), attempt, self.max_retries)
            ok, bad = self._run_batch(pending)
            got.update(ok)
            errors.update(bad)
        for c in ids:
            if c not in got:
                raise BackendError(f"{self.role}: {self.model} at {self.host}: batch line custom_id {c} failed after "
                                   f"{self.max_retries + 1} attempts: {self._scrub(errors.get(c, 'no answer'))[:300]}")
        return [self._completion(got[c]) for c in ids]

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        raise BackendError(f"{self.role}: openai_batch cannot score (use backend: openai for scoring)")

    def _completion(self, body: dict) -> Completion:
        choice = (body.get("choices") or [{}])[0]
        text = ((choice.get("message") or {}).get("content") if self.chat else choice.get("text")) or ""
        served = (body.get("usage") or {}).get("completion_tokens")
        return Completion(text=text, token_ids=None, finish_reason="length" if choice.get("finish_reason") == "length"
                          else "stop", completion_tokens=int(served) if served is not None else None)

    # ---- one batch ------------------------------------------------------------------------------
    def _run_batch(self, pending: dict[str, dict]) -> tuple[dict[str, dict], dict[str, str]]:
        """``({custom_id: response body}, {custom_id: error})`` of one batch over ``pending``."""
        endpoint = "/v1/chat/completions" if self.chat else "/v1/completions"
        lines = [json.dumps({"custom_id": c, "method": "POST", "url": endpoint, "body": pending[c]},
                            sort_keys=True, separators=(",", ":"), ensure_ascii=False) for c in sorted(pending)]
        data = ("\n".join(lines) + "\n").encode("utf-8")
        key = hashlib.sha256(data).hexdigest()
        path = self.state_dir / f"{key}.json"
        state = json.loads(path.read_text()) if path.is_file() else {}
        batch = None
        if state.get("batch_id"):
            batch = self._call(lambda: _or_none(lambda: self._client.batches.retrieve(state["batch_id"])))
            if batch is None:
                log.warning("%s: batch %s of %s is unknown to the server; submitting again", self.role,
                            state["batch_id"], path.name)
                state = {}
            else:
                log.info("%s: re-attaching to batch %s (%d requests)", self.role, batch.id, len(lines))
        if batch is None:
            if not state.get("input_file_id"):
                f = self._call(lambda: self._client.files.create(file=(f"{key[:16]}.jsonl", data), purpose="batch"))
                state = {"input_file_id": f.id, "requests": len(lines), "endpoint": endpoint}
                _write_state(path, state)
            batch = self._call(lambda: self._client.batches.create(input_file_id=state["input_file_id"],
                                                                   endpoint=endpoint, completion_window="24h"))
            state["batch_id"] = batch.id
            _write_state(path, state)  # before polling: a run killed from here on re-attaches
            log.info("%s: batch %s created (%d requests)", self.role, batch.id, len(lines))
        batch = self._poll(batch)
        try:
            return self._read(batch, pending)
        finally:
            path.unlink(missing_ok=True)  # read (or failed for good): a rerun must not re-attach to it

    def _call(self, fn):
        return self._with_retries(fn)

    def _poll(self, batch):
        deadline = time.monotonic() + self.batch_timeout_s
        while batch.status not in TERMINAL:
            if time.monotonic() >= deadline:
                raise BackendError(f"{self.role}: batch {batch.id} at {self.host} not finished within "
                                   f"{self.batch_timeout_s:g} s (status {batch.status}); rerun to re-attach to it")
            time.sleep(min(self.poll_s, max(deadline - time.monotonic(), 0.0)))
            batch = self._call(lambda bid=batch.id: self._client.batches.retrieve(bid))
        return batch

    def _read(self, batch, pending: dict) -> tuple[dict[str, dict], dict[str, str]]:
        if batch.status == "failed" and not batch.output_file_id and not batch.error_file_id:
            errs = getattr(getattr(batch, "errors", None), "data", None) or []
            why = "; ".join(str(getattr(e, "message", e)) for e in errs[:2]) or "no reason given"
            raise BackendError(f"{self.role}: batch {batch.id} at {self.host} failed: {self._scrub(why)[:300]}")
        ok: dict[str, dict] = {}
        bad: dict[str, str] = {}
        for fid in (batch.output_file_id, batch.error_file_id):
            if not fid:
                continue
            text = self._call(lambda fid=fid: self._client.files.content(fid)).text
            for raw in text.splitlines():
                try:
                    row = json.loads(raw)
                except ValueError:
                    continue
                cid = row.get("custom_id") if isinstance(row, dict) else None
                if cid not in pending:
                    continue
                resp = row.get("response") or {}
                if resp.get("status_code") == 200 and isinstance(resp.get("body"), dict) and not row.get("error"):
                    ok[cid] = resp["body"]
                else:
                    err = (row.get("error") or {}).get("message") or \
                        ((resp.get("body") or {}).get("error") or {}).get("message") or \
                        f"HTTP {resp.get('status_code')}"
                    bad[cid] = f"{err} (HTTP {resp.get('status_code')})" if resp.get("status_code") else err
        for cid in pending:
            if cid not in ok and cid not in bad:
                bad[cid] = f"no output line (batch {batch.status})"
        return ok, bad


def _or_none(fn):
    """``fn()``, or None when the server does not know the object (404)."""
    import openai

    try:
        return fn()
    except openai.NotFoundError:
        return None
