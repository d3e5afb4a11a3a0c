"""A per-role requests-per-minute and tokens-per-minute budget, honoured across threads.

``RateLimiter(rpm, tpm).acquire(tokens)`` blocks until one more request of ``tokens`` tokens fits in
both budgets over the sliding window that ends now (``window_s``, 60 s): every request granted in
the last minute, and their tokens, are kept in a log, so no 60 s interval ever holds more than
``rpm`` requests or ``tpm`` tokens (a fixed per-minute bucket would allow twice that across a
bucket boundary). One lock serialises the waiters (first come, first served), and the clock and the
sleep are injectable, so tests run minutes of virtual time in milliseconds.

What a request costs in tokens (:func:`request_tokens`): its ``max_tokens`` plus its prompt at 4
characters a token, as OpenAI's own limiter estimates it before the reply exists. A request larger
than the whole ``tpm`` budget is a ``ConfigError`` (it could never be sent).

The budget is per process: ``N`` workers against one endpoint each get the endpoint's limit over
``N`` (docs/design.md, "Past one machine").
"""

from __future__ import annotations

import collections
import math
import threading
import time
from typing import Callable

from teams_rl_jax.errors import ConfigError

WINDOW_S = 60.0
CHARS_PER_TOKEN = 4


def request_tokens(prompt_chars: int, max_tokens: int) -> int:
    """The tokens a request is charged before it is sent: prompt (4 characters a token) + reply budget."""
    return math.ceil(prompt_chars / CHARS_PER_TOKEN) + int(max_tokens)


class RateLimiter:
    """Sliding-window request and token budget (see the module docstring); None = no limit."""

    def __init__(self, rpm: int | None = None, tpm: int | None = None, *, role: str = "role",
                 window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.rpm, self.tpm, self.role, self.window_s = rpm, tpm, role, float(window_s)
        self.clock, self.sleep = clock, sleep
        self._log: collections.deque[tuple[float, int]] = collections.deque()  # (granted at, tokens)
        self._tokens = 0
        self._lock = threading.Lock()
        self.waited_s = 0.0  # total time spent waiting for the budget (all threads)

    @property
    def active(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    def _prune(self, now: float) -> None:
        while self._log and self._log[0][0] <= now - self.window_s:
            self._tokens -= self._log.popleft()[1]

    def _wait_needed(self, now: float, tokens: int) -> float:
        """Seconds until a request of ``tokens`` fits (0: it fits now)."""
        wait = 0.0
        if self.rpm is not None and len(self._log) >= self.rpm:
            wait = max(wait, self._log[len(self._log) - self.rpm][0] + self.window_s - now)
        if self.tpm is not None and self._tokens + tokens > self.tpm:
            over, freed = self._tokens + tokens - self.tpm, 0
            for t, n in self._log:  # the oldest entries whose expiry frees enough tokens
                freed += n
                if freed >= over:
                    wait = max(wait, t + self.window_s - now)
                    break
        return wait

    def acquire(self, tokens: int = 0) -> float:
        """Block until a request of ``tokens`` fits both budgets; records it and returns the grant time."""
        if not self.active:
            return self.clock()
        if self.tpm is not None and tokens > self.tpm:
            raise ConfigError(f"roles.{self.role}.tokens_per_minute: one request needs {tokens} tokens, more than "
                              f"the budget of {self.tpm} (lower max_new_tokens or raise the budget)")
        with self._lock:
            while True:
                now = self.clock()
                self._prune(now)
                wait = self._wait_needed(now, tokens)
                if wait <= 0:
                    self._log.append((now, tokens))
                    self._tokens += tokens
                    return now
                self.waited_s += wait
                self.sleep(wait)
