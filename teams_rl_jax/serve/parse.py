"""Parsing and validating OpenAI request bodies by hand, so every error names its field.

Every check raises :class:`ApiError` (status, OpenAI's error ``type``/``param``/``code``); the app turns
it into OpenAI's error body. Nothing here touches the model except through the ``positions``/``vocab``
numbers and the already tokenized prompts it is given.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from starlette.requests import Request


@dataclasses.dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20        # request body
    max_prompt_tokens: int = 4096        # after rendering + tokenizing
    max_tokens: int = 1024               # per request
    max_n: int = 8                       # choices per request
    max_prompts: int = 64                # prompts in one /v1/completions list


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def field(body: dict, name: str, kinds: tuple, default: Any, *, lo=None, hi=None) -> Any:
    """``body[name]`` (``default`` when absent or null), checked to be of ``kinds`` within ``[lo, hi]``."""
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        raise ApiError(400, f"'{name}' must be {' or '.join(k.__name__ for k in kinds)}", param=name)
    if lo is not None and v < lo:
        raise ApiError(400, f"'{name}' must be >= {lo}, got {v}", param=name)
    if hi is not None and v > hi:
        raise ApiError(400, f"'{name}' must be <= {hi}, got {v}", param=name)
    return v


async def read_bytes(request: Request, limit: int, what: str = "request body") -> bytes:
    """The raw body, 413 over ``limit`` bytes (with or without a content-length)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"{what} over {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():  # also bounds chunked bodies without a content-length
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"{what} over {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_body(request: Request, limits: Limits) -> dict:
    """The JSON object of a request: 413 over ``max_body_bytes``, 400 for bad JSON."""
    raw = await read_bytes(request, limits.max_body_bytes)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def check_model(body: dict, model_name: str) -> None:
    """400 for a missing ``model``, 404 for another model than ``model_name``."""
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required", param="model")
    if model != model_name:
        raise ApiError(404, f"model '{model[:100]}' does not exist (this server serves '{model_name}')",
                       param="model", code="model_not_found")


_PARAM = re.compile(r'(?:^|;)\s*([a-zA-Z_-]+)="([^"]*)"')


def multipart_form(raw: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """``{field: (filename or None, bytes)}`` of a ``multipart/form-data`` body (already size-bounded).

    A small parser of our own (boundary split, RFC 7578) instead of a dependency on python-multipart.
    """
    kind, _, rest = content_type.partition(";")
    m = re.search(r'boundary="?([^";]+)"?', rest)
    if kind.strip().lower() != "multipart/form-data" or m is None:
        raise ApiError(400, "expected a multipart/form-data body with a boundary")
    delim = b"--" + m.group(1).encode("latin-1")
    parts = raw.split(delim)
    if len(parts) < 3 or not parts[-1].startswith(b"--"):
        raise ApiError(400, "malformed multipart body (no closing boundary)")
    out: dict[str, tuple[str | None, bytes]] = {}
    for part in parts[1:-1]:
        part = part[2:] if part.startswith(b"\r\n") else part
        head, sep, data = part.partition(b"\r\n\r\n")
        if not sep:
            raise ApiError(400, "malformed multipart body (a part without headers)")
        data = data[:-2] if data.endswith(b"\r\n") else data
        params: dict[str, str] = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-disposition":
                params = {k.lower(): v for k, v in _PARAM.findall(value)}
        if "name" in params:
            out[params["name"]] = (params.get("filename"), data)
    return out


def sampling(body: dict, limits: Limits, default_max_tokens: int | None = 16) -> dict:
    """``max_tokens, temperature, top_p, n, seed, stop`` of a request.

    /v1/completions defaults to 16 tokens (OpenAI's default); chat to what the context leaves (None
    here, resolved once the prompt is tokenized).
    """
    max_tokens = field(body, "max_tokens", (int,), default_max_tokens, lo=0, hi=limits.max_tokens)
    max_tokens = field(body, "max_completion_tokens", (int,), max_tokens, lo=0, hi=limits.max_tokens)
    temperature = float(field(body, "temperature", (int, float), 1.0, lo=0.0, hi=2.0))
    top_p = float(field(body, "top_p", (int, float), 1.0, lo=0.0, hi=1.0))
    if top_p <= 0.0:
        raise ApiError(400, "'top_p' must be > 0", param="top_p")
    n = field(body, "n", (int,), 1, lo=1, hi=limits.max_n)
    seed = field(body, "seed", (int,), None)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)
                             or len(stop) > 4):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    return dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, n=n, seed=seed, stop=stop)


def prompts(body: dict, limits: Limits) -> list[str | list[int]]:
    """The prompts of a /v1/completions request: strings, or one prompt given as token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        out: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        out = prompt
    elif isinstance(prompt, list) and prompt and all(type(p) is int for p in prompt):
        out = [list(prompt)]  # one prompt given as token ids
    else:
        raise ApiError(400, "'prompt' must be a string, a list of strings or a list of token ids", param="prompt")
    if len(out) > limits.max_prompts:
        raise ApiError(400, f"at most {limits.max_prompts} prompts per request", param="prompt")
    return out


def check_token_ids(ids: list[int], vocab: int) -> None:
    if any(not 0 <= t < vocab for t in ids):
        raise ApiError(400, f"token ids must be in [0, {vocab})", param="prompt")


def check_echo(body: dict, max_tokens: int) -> tuple[bool, Any]:
    """``(echo, logprobs)``; prompt log-probs are only served for scoring (``max_tokens=0``)."""
    echo, logprobs = bool(body.get("echo", False)), body.get("logprobs")
    if echo and logprobs is not None and max_tokens != 0:
        raise ApiError(400, "'echo' with 'logprobs' is supported only with max_tokens=0", param="logprobs")
    return echo, logprobs


def messages(body: dict) -> list[dict[str, str]]:
    """The chat ``messages`` as ``[{"role", "content"}]`` (other keys dropped)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise ApiError(400, "each message needs a role (system/user/assistant) and a string content",
                           param="messages")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def check_prompt(ids: list[int], max_tokens: int, limits: Limits, positions: int) -> None:
    """400 when the prompt is over ``max_prompt_tokens`` or prompt + ``max_tokens`` over the model's positions."""
    if len(ids) > limits.max_prompt_tokens:
        raise ApiError(400, f"prompt has {len(ids)} tokens, over the limit of {limits.max_prompt_tokens}",
                       param="prompt", code="context_length_exceeded")
    if len(ids) + max_tokens > positions:
        raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                       f"{positions} positions", param="max_tokens", code="context_length_exceeded")
