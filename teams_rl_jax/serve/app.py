"""The OpenAI-compatible HTTP API over a ``FlaxBackend`` (FastAPI on uvicorn).

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream``
answers with server-sent events: the whole completion in one chunk, then ``[DONE]``), ``GET /stats``
(generate calls, rows, requests; behind auth like the rest) and ``GET /health`` (no auth).

Every client error is a 4xx with OpenAI's error body ``{"error": {"message", "type", "param",
"code"}}``: malformed JSON or invalid fields 400, bad/missing bearer token 401, unknown model 404,
body over ``max_body_bytes`` 413, prompt over ``max_prompt_tokens`` / ``max_tokens`` over its limit /
``n`` over its limit / prompt + max_tokens over the model's positions 400. Bodies are parsed by hand
(not FastAPI's 422 validation) so every message says which field is wrong, in OpenAI's shape.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from teams_rl_jax.serve.batcher import Batcher


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


def _error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _field(body: dict, name: str, kinds: tuple, default: Any, *, lo=None, hi=None) -> Any:
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


def make_app(backend, *, model_name: str | None = None, api_key: str | None = None, limits: Limits | None = None,
             batch_wait_ms: float = 5.0) -> FastAPI:
    """The ASGI app serving ``backend`` (a ``FlaxBackend``) as ``model_name``.

    ``api_key``: when set, every ``/v1`` and ``/stats`` request needs ``Authorization: Bearer <key>``.
    """
    limits = limits or Limits()
    name = model_name or backend.model
    positions = backend.lm.config.max_position_embeddings
    batcher = Batcher(backend, max_batch=backend.max_batch, wait_ms=batch_wait_ms)
    stats = {"requests": 0, "completion_tokens": 0, "prompt_tokens": 0}
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        batcher.start()  # the worker lives on the server's event loop
        yield
        await batcher.stop()

    app = FastAPI(title="teams-rl-jax OpenAI-compatible server", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError):
        return _error(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):  # unknown routes, wrong methods
        return _error(e.status_code, str(e.detail), "invalid_request_error")

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # Constant-time comparison: response timing must not reveal how much of the key matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "invalid or missing bearer token", type_="authentication_error",
                           code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            raise ApiError(413, f"request body over {limits.max_body_bytes} bytes", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():  # also bounds chunked bodies without a content-length
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise ApiError(413, f"request body over {limits.max_body_bytes} bytes", code="request_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "'model' is required", param="model")
        if model != name:
            raise ApiError(404, f"model '{model[:100]}' does not exist (this server serves '{name}')",
                           param="model", code="model_not_found")
        return body

    def sampling(body: dict, default_max_tokens: int | None = 16) -> dict:
        # /v1/completions defaults to 16 tokens (OpenAI's default); chat to what the context leaves
        # (None here, resolved once the prompt is tokenized).
        max_tokens = _field(body, "max_tokens", (int,), default_max_tokens, lo=0, hi=limits.max_tokens)
        max_tokens = _field(body, "max_completion_tokens", (int,), max_tokens, lo=0, hi=limits.max_tokens)
        temperature = float(_field(body, "temperature", (int, float), 1.0, lo=0.0, hi=2.0))
        top_p = float(_field(body, "top_p", (int, float), 1.0, lo=0.0, hi=1.0))
        if top_p <= 0.0:
            raise ApiError(400, "'top_p' must be > 0", param="top_p")
        n = _field(body, "n", (int,), 1, lo=1, hi=limits.max_n)
        seed = _field(body, "seed", (int,), None)
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)
                                 or len(stop) > 4):
            raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
        return dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, n=n, seed=seed, stop=stop)

    def check_prompt(ids: list[int], max_tokens: int) -> None:
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(400, f"prompt has {len(ids)} tokens, over the limit of {limits.max_prompt_tokens}",
                           param="prompt", code="context_length_exceeded")
        if len(ids) + max_tokens > positions:
            raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                           f"{positions} positions", param="max_tokens", code="context_length_exceeded")

    async def run(ids_list: list[list[int]], s: dict):
        rows = [ids for ids in ids_list for _ in range(s["n"])]
        if s["max_tokens"] == 0:
            from teams_rl_jax.backends.base import Completion

            return [Completion("", (), "length") for _ in rows]
        return await batcher.submit(rows, max_tokens=s["max_tokens"], temperature=s["temperature"], top_p=s["top_p"],
                                    stop=s["stop"], seed=s["seed"])

    def usage(prompt_tokens: int, outs) -> dict:
        completion = sum(len(o.token_ids or ()) for o in outs)
        stats["requests"] += 1
        stats["prompt_tokens"] += prompt_tokens
        stats["completion_tokens"] += completion
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        card = {"id": name, "object": "model", "created": created, "owned_by": "teams-rl-jax",
                "max_model_len": positions}
        return {"object": "list", "data": [card]}

    @app.get("/stats")
    async def get_stats(request: Request):
        check_auth(request)
        return {**stats, "generate_calls": backend.generate_calls, "batches": batcher.generate_calls,
                "rows": batcher.rows, "max_rows_per_call": batcher.max_rows_per_call, "max_batch": batcher.max_batch}

    def echo_logprobs(text: str, ids: list[int]) -> dict:
        """Prompt tokens, their log-probs and text offsets (for ``echo`` + ``logprobs`` scoring)."""
        enc = backend.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [int(a) for a, _ in enc["offset_mapping"]]
        if len(offsets) < len(ids):  # the BOS the backend prepended: no text
            offsets = [0] * (len(ids) - len(offsets)) + offsets
        lps = backend.token_logprobs([ids])[0]
        return {"tokens": [backend.tokenizer.convert_ids_to_tokens(i) for i in ids],
                "token_logprobs": [None] + lps[1:], "text_offset": offsets, "top_logprobs": None}

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_auth(request)
        body = await read_json(request)
        s = sampling(body)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        elif isinstance(prompt, list) and prompt and all(type(p) is int for p in prompt):
            prompts = [list(prompt)]  # one prompt given as token ids
        else:
            raise ApiError(400, "'prompt' must be a string, a list of strings or a list of token ids", param="prompt")
        if len(prompts) > limits.max_prompts:
            raise ApiError(400, f"at most {limits.max_prompts} prompts per request", param="prompt")
        vocab = backend.lm.config.vocab_size
        ids_list = []
        for p in prompts:
            ids = list(p) if isinstance(p, list) else backend.encode(p)
            if isinstance(p, list) and any(not 0 <= t < vocab for t in ids):
                raise ApiError(400, f"token ids must be in [0, {vocab})", param="prompt")
            check_prompt(ids, s["max_tokens"])
            ids_list.append(ids)
        echo = bool(body.get("echo", False))
        logprobs = body.get("logprobs")
        if echo and logprobs is not None and s["max_tokens"] != 0:
            raise ApiError(400, "'echo' with 'logprobs' is supported only with max_tokens=0", param="logprobs")
        outs = await run(ids_list, s)
        choices = []
        for k, out in enumerate(outs):
            p = prompts[k // s["n"]]
            text = out.text
            lp = None
            if echo:
                ptext = p if isinstance(p, str) else backend.decode(p)
                text = ptext + text
                if logprobs is not None:
                    lp = echo_logprobs(ptext, ids_list[k // s["n"]])
            choices.append({"index": k, "text": text, "logprobs": lp, "finish_reason": out.finish_reason})
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name, "choices": choices, "usage": usage(sum(map(len, ids_list)), outs)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        body = await read_json(request)
        s = sampling(body, default_max_tokens=None)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", param="messages")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise ApiError(400, "each message needs a role (system/user/assistant) and a string content",
                               param="messages")
        try:
            ids = backend.encode(backend.render([{"role": m["role"], "content": m["content"]} for m in messages]))
        except Exception as e:  # noqa: BLE001 - a template that rejects this conversation is a client error
            raise ApiError(400, f"cannot apply the chat template ({type(e).__name__})", param="messages") from None
        if s["max_tokens"] is None:
            s["max_tokens"] = max(min(limits.max_tokens, positions - len(ids)), 1)
        check_prompt(ids, s["max_tokens"])
        outs = await run([ids], s)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        use = usage(len(ids), outs)
        if body.get("stream"):
            def events():
                for k, out in enumerate(outs):
                    for delta, reason in (({"role": "assistant", "content": out.text}, None), ({}, out.finish_reason)):
                        chunk = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": name,
                                 "choices": [{"index": k, "delta": delta, "finish_reason": reason}]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        choices = [{"index": k, "message": {"role": "assistant", "content": out.text},
                    "finish_reason": out.finish_reason, "logprobs": None} for k, out in enumerate(outs)]
        return {"id": rid, "object": "chat.completion", "created": now, "model": name, "choices": choices,
                "usage": use}

    app.state.batcher = batcher
    return app
