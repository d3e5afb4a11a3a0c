"""Any OpenAI-compatible endpoint as a role: the official ``openai`` client, with our own retries.

Why our own retries: the client's built-in retries (disabled here with ``max_retries=0``) are
invisible, so a run could not report how flaky its endpoint was; ours are counted (``retries``),
logged (without the key) and also cover what the client does not retry (a 200 with invalid JSON).

* Concurrency: a batch is sent by a thread pool of ``max_concurrency`` workers, so at most that many
  requests are in flight per backend (the sync client is thread-safe; the env's host loop and the
  generate stage are synchronous code, so no event loop is imposed on callers).
* Budgets: ``requests_per_minute`` / ``tokens_per_minute`` (None: none), one sliding-window
  :class:`~teams_rl_jax.backends.ratelimit.RateLimiter` per backend shared by its threads; every
  attempt (retries included) is charged before it is sent.
* Per request: ``timeout_s``. Retried: 429, 5xx, timeouts, connection errors, unparseable replies,
  with exponential backoff and full jitter (``uniform(0, min(max_backoff_s, backoff_s * 2**k))``);
  a ``Retry-After`` (or ``retry-after-ms``) header is honoured, capped at ``max_backoff_s``.
  Other 4xx are the caller's fault and fail at once. After the last retry: ONE ``BackendError``
  naming role, model, endpoint host and status, never the key.
* The key is read once from ``os.environ[api_key_env]`` at build time and lives only inside the
  client; it is in no repr, log line or error (error text is also scrubbed of it).
"""

from __future__ import annotations

import concurrent.futures
import email.utils
import logging
import os
import random
import threading
import time
from typing import Sequence
from urllib.parse import urlparse

from teams_rl_jax.backends.base import Completion, Prompt, QueryCounter
from teams_rl_jax.backends.ratelimit import RateLimiter, request_tokens
from teams_rl_jax.data.chat import render_chat
from teams_rl_jax.errors import BackendError, ConfigError

log = logging.getLogger(__name__)

RETRY_STATUS = (408, 409, 425, 429)  # plus every 5xx


def parse_retry_after(headers) -> float | None:
    """Seconds to wait from ``retry-after-ms`` / ``retry-after`` (seconds or an HTTP date), else None."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra is None:
        return None
    try:
        return max(float(ra), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


class _Retryable(Exception):
    """One failed attempt that may be retried: ``status`` (None for transport errors), ``wait`` hint."""

    def __init__(self, reason: str, status: int | None = None, wait: float | None = None):
        super().__init__(reason)
        self.reason, self.status, self.wait = reason, status, wait



def api_key(cfg, role: str) -> str | None:
    """The key of a role's endpoint: ``os.environ[cfg.api_key_env]`` (None without ``api_key_env``); an unset
    variable is a one-line ``ConfigError`` naming the variable, never a value."""
    if not cfg.api_key_env:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise ConfigError(f"roles.{role}.api_key_env: environment variable {cfg.api_key_env} is not set")
    return key

class OpenAIBackend:
    """``Backend`` over an OpenAI-compatible HTTP endpoint (see the module docstring)."""

    kind = "openai"  # implementation name (response-cache keys, provenance)

    def __init__(self, *, base_url: str, model: str, role: str, counter: QueryCounter | None = None,
                 api_key: str | None = None, chat: bool = True, max_concurrency: int = 8, timeout_s: float = 60.0,
                 max_retries: int = 5, backoff_s: float = 0.5, max_backoff_s: float = 30.0, seed: int = 0,
                 requests_per_minute: int | None = None, tokens_per_minute: int | None = None,
                 clock=time.monotonic, sleep=time.sleep):
        import openai

        self.role = role
        self.model = model
        self.counter = counter if counter is not None else QueryCounter()
        self.base_url = base_url
        self.host = urlparse(base_url).netloc or base_url
        self.chat = chat
        self.max_concurrency = int(max_concurrency)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.retries = 0  # retried attempts so far (all calls)
        self._lock = threading.Lock()
        self._jitter = random.Random(seed)  # seeded: backoff sleeps are reproducible
        self.limiter = RateLimiter(requests_per_minute, tokens_per_minute, role=role, clock=clock, sleep=sleep)
        # The key stays in the client and in this one private attribute (used to scrub error text).
        self.__key = api_key or ""
        # An endpoint without auth still needs a non-empty key for the client; "EMPTY" is vLLM's convention.
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", max_retries=0, timeout=timeout_s)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.max_concurrency,
                                                           thread_name_prefix=f"openai-{role}")

    @classmethod
    def from_config(cls, cfg, *, role: str, counter: QueryCounter | None = None, **kw) -> "OpenAIBackend":
        """From a ``RoleConfig`` with ``backend: openai``; the key comes from ``os.environ[cfg.api_key_env]``
        (``kw``: the constructor's ``clock``/``sleep``, for tests)."""
        return cls(base_url=cfg.base_url, model=cfg.model, role=role, counter=counter, api_key=api_key(cfg, role),
                   chat=cfg.chat, max_concurrency=cfg.max_concurrency, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
                   backoff_s=cfg.backoff_s, max_backoff_s=cfg.max_backoff_s,
                   requests_per_minute=cfg.requests_per_minute, tokens_per_minute=cfg.tokens_per_minute, **kw)

    def __repr__(self) -> str:
        return f"OpenAIBackend(role={self.role!r}, model={self.model!r}, host={self.host!r})"

    __str__ = __repr__

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._client.close()

    # ---- requests -------------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        text = str(text).splitlines()[0] if str(text) else ""
        return text.replace(self.__key, "***") if self.__key else text

    def _attempt(self, fn):
        """Run one request; map failures to ``_Retryable`` or a final ``BackendError``."""
        import openai

        try:
            return fn()
        except openai.APITimeoutError:
            raise _Retryable(f"no reply within {self.timeout_s:g} s") from None
        except openai.APIConnectionError as e:
            raise _Retryable(f"connection error ({type(e.__cause__ or e).__name__})") from None
        except openai.APIStatusError as e:
            status = e.status_code
            if status in RETRY_STATUS or status >= 500:
                raise _Retryable(f"HTTP {status}", status, parse_retry_after(e.response.headers)) from None
            raise BackendError(f"{self.role}: {self.model} at {self.host} refused the request "
                               f"(HTTP {status}: {self._scrub(e.message)[:200]})") from None
        except (ValueError, openai.APIResponseValidationError) as e:  # json.JSONDecodeError is a ValueError
            raise _Retryable(f"unparseable reply ({type(e).__name__})") from None

    def _with_retries(self, fn, tokens: int = 0):
        last: _Retryable | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                wait = self._jitter.uniform(0.0, min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))
                if last is not None and last.wait is not None:
                    wait = min(max(wait, last.wait), self.max_backoff_s)
                with self._lock:
                    self.retries += 1
                log.warning("%s: %s at %s: %s; retry %d/%d in %.2f s", self.role, self.model, self.host,
                            last.reason, attempt, self.max_retries, wait)
                time.sleep(wait)
            self.limiter.acquire(tokens)  # every attempt is a request the endpoint counts
            try:
                return self._attempt(fn)
            except _Retryable as e:
                last = e
        status = f" (status {last.status})" if last and last.status else ""
        raise BackendError(f"{self.role}: {self.model} at {self.host} failed after {self.max_retries + 1} attempts: "
                           f"{last.reason if last else 'unknown'}{status}")

    def _messages(self, prompt: Prompt) -> list[dict]:
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}]
        return [{"role": m["role"], "content": m["content"]} for m in prompt]

    def _text(self, prompt: Prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        return render_chat(None, list(prompt))  # no tokenizer here: Vicuna v1.1 wording

    def _one(self, prompt: Prompt, kw: dict) -> Completion:
        if self.chat:
            msgs = self._messages(prompt)
            tokens = request_tokens(sum(len(m["content"]) for m in msgs), kw["max_tokens"])
            resp = self._with_retries(lambda: _one_choice(self._client.chat.completions.create(
                model=self.model, messages=msgs, **kw)), tokens)
            text = (resp[0].message.content if resp[0].message is not None else None) or ""
        else:
            text_prompt = self._text(prompt)
            resp = self._with_retries(lambda: _one_choice(self._client.completions.create(
                model=self.model, prompt=text_prompt, **kw)), request_tokens(len(text_prompt), kw["max_tokens"]))
            text = resp[0].text or ""
        choice, usage = resp
        reason = "length" if choice.finish_reason == "length" else "stop"
        # One choice per request, so the reply's usage is this answer's length in the served model's tokens.
        served = getattr(usage, "completion_tokens", None) if usage is not None else None
        return Completion(text=text, token_ids=None, finish_reason=reason,
                          completion_tokens=int(served) if served is not None else None)

    def complete(self, prompts: Sequence[Prompt], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, stop: Sequence[str] | None = None, seed: int | None = None
                 ) -> list[Completion]:
        """One completion per prompt, ``max_concurrency`` requests in flight; counts ``len(prompts)`` queries."""
        prompts = list(prompts)
        self.counter.add(self.role, len(prompts))
        kw: dict = dict(max_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p))
        if stop:
            kw["stop"] = list(stop)
        if seed is not None:
            kw["seed"] = int(seed)
        futures = [self._pool.submit(self._one, p, kw) for p in prompts]
        return [f.result() for f in futures]  # the first failure propagates as its BackendError

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        """Sum of log-probs of each continuation, via ``/v1/completions`` with ``echo`` + ``logprobs``.

        Raises ``BackendError`` when the server cannot echo prompt log-probs (many chat-only APIs).
        """
        prompts, continuations = list(prompts), list(continuations)
        if len(prompts) != len(continuations):
            raise BackendError(f"{self.role}: {len(prompts)} prompts for {len(continuations)} continuations")
        self.counter.add(self.role, len(prompts))

        def one(prompt: str, cont: str) -> float:
            choice = self._with_retries(lambda: _first_choice(self._client.completions.create(
                model=self.model, prompt=prompt + cont, max_tokens=0, echo=True, logprobs=0, temperature=0.0)),
                request_tokens(len(prompt + cont), 0))
            lp = getattr(choice, "logprobs", None)
            if lp is None or not lp.token_logprobs or lp.text_offset is None:
                raise BackendError(f"{self.role}: {self.model} at {self.host} cannot score (no echoed logprobs)")
            total = 0.0
            for off, val in zip(lp.text_offset, lp.token_logprobs):
                if off >= len(prompt) and val is not None:
                    total += float(val)
            return total

        futures = [self._pool.submit(one, p, c) for p, c in zip(prompts, continuations)]
        return [f.result() for f in futures]


def _first_choice(resp):
    """The reply's first choice; a reply that is not a completion object (e.g. a non-JSON body the
    client passed through as text) is an unparseable reply, retried like one."""
    choices = getattr(resp, "choices", None)
    if not choices:
        raise _Retryable("unparseable reply (no choices)")
    return choices[0]


def _one_choice(resp):
    """``(first choice, usage or None)`` of a reply (see :func:`_first_choice`)."""
    return _first_choice(resp), getattr(resp, "usage", None)
