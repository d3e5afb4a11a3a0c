"""The OpenAI-compatible HTTP API over a ``FlaxBackend`` (FastAPI on uvicorn).

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream``
answers with server-sent events: the whole completion in one chunk, then ``[DONE]``), OpenAI's Batch
API (``/v1/files``, ``/v1/batches``: :mod:`~teams_rl_jax.serve.batch`, each line answered by
:meth:`Service.answer`, the live routes' own handler), ``GET /stats``
(generate calls, rows, requests; behind auth like the rest) and ``GET /health`` (no auth).

Every client error is a 4xx with OpenAI's error body ``{"error": {"message", "type", "param",
"code"}}``: malformed JSON or invalid fields 400, bad/missing bearer token 401, unknown model 404,
body over ``max_body_bytes`` 413, prompt over ``max_prompt_tokens`` / ``max_tokens`` over its limit /
``n`` over its limit / prompt + max_tokens over the model's positions 400. Bodies are parsed by hand
(not FastAPI's 422 validation, see :mod:`~teams_rl_jax.serve.parse`) so every message says which
field is wrong, in OpenAI's shape.

Layout: :class:`Service` answers requests (parsed bodies in, OpenAI response dicts out), the
:class:`~teams_rl_jax.serve.batcher.Batcher` batches their generates, :func:`make_app` wires both to
FastAPI routes.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import tempfile
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from teams_rl_jax.backends.base import Completion
from teams_rl_jax.serve import parse
from teams_rl_jax.serve.batch import BatchLimits, BatchRunner, Store
from teams_rl_jax.serve.batcher import Batcher
from teams_rl_jax.serve.parse import ApiError, Limits

__all__ = ["ApiError", "Limits", "Service", "make_app"]


def _error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class Service:
    """The server's state (backend, batcher, limits, counters) and one method per endpoint."""

    def __init__(self, backend, *, model_name: str | None, api_key: str | None, limits: Limits):
        self.backend, self.api_key, self.limits = backend, api_key, limits
        self.name = model_name or backend.model
        self.positions = backend.lm.config.max_position_embeddings
        self.batcher = Batcher(backend)
        self.stats = {"requests": 0, "completion_tokens": 0, "prompt_tokens": 0}
        self.created = int(time.time())
        self.runner: BatchRunner | None = None  # the Batch API (make_app sets it)

    # ---- shared steps ---------------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Constant-time comparison: response timing must not reveal how much of the key matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "invalid or missing bearer token", type_="authentication_error",
                           code="invalid_api_key")

    async def body(self, request: Request) -> dict:
        self.check_auth(request)
        return await parse.read_body(request, self.limits)

    async def answer(self, endpoint: str, body: dict, *, stream_ok: bool = True):
        """The one handler of a generation request (``endpoint``: ``/v1/completions`` or
        ``/v1/chat/completions``), for the live routes and for every line of a batch alike."""
        parse.check_model(body, self.name)
        if body.get("stream") and not stream_ok:
            raise ApiError(400, "'stream' is not supported in a batch", param="stream")
        if endpoint == "/v1/completions":
            return await self.completions(body)
        if endpoint == "/v1/chat/completions":
            return await self.chat_completions(body)
        raise ApiError(404, f"unknown endpoint {endpoint[:80]}", param="url")

    async def generate(self, ids_list: list[list[int]], s: dict) -> list[Completion]:
        rows = [ids for ids in ids_list for _ in range(s["n"])]
        if s["max_tokens"] == 0:
            return [Completion("", (), "length") for _ in rows]
        return await self.batcher.submit(rows, max_tokens=s["max_tokens"], temperature=s["temperature"],
                                         top_p=s["top_p"], stop=s["stop"], seed=s["seed"])

    def usage(self, prompt_tokens: int, outs) -> dict:
        completion = sum(len(o.token_ids or ()) for o in outs)
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += prompt_tokens
        self.stats["completion_tokens"] += completion
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def echo_logprobs(self, text: str, ids: list[int]) -> dict:
        """Prompt tokens, their log-probs and text offsets (for ``echo`` + ``logprobs`` scoring)."""
        tok = self.backend.tokenizer
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [int(a) for a, _ in enc["offset_mapping"]]
        if len(offsets) < len(ids):  # the BOS the backend prepended: no text
            offsets = [0] * (len(ids) - len(offsets)) + offsets
        lps = self.backend.token_logprobs([ids])[0]
        return {"tokens": [tok.convert_ids_to_tokens(i) for i in ids],
                "token_logprobs": [None] + lps[1:], "text_offset": offsets, "top_logprobs": None}

    # ---- endpoints ------------------------------------------------------------------------------
    def models(self) -> dict:
        card = {"id": self.name, "object": "model", "created": self.created, "owned_by": "teams-rl-jax",
                "max_model_len": self.positions}
        return {"object": "list", "data": [card]}

    def get_stats(self) -> dict:
        b = self.batcher
        return {**self.stats, "generate_calls": self.backend.generate_calls, "batches": b.generate_calls,
                "rows": b.rows, "max_rows_per_call": b.max_rows_per_call, "max_batch": b.max_batch,
                "rows_in_flight": b.in_flight}

    def _prompt_ids(self, prompts: list, max_tokens: int) -> list[list[int]]:
        vocab = self.backend.lm.config.vocab_size
        ids_list = []
        for p in prompts:
            if isinstance(p, list):
                ids = list(p)
                parse.check_token_ids(ids, vocab)
            else:
                ids = self.backend.encode(p)
            parse.check_prompt(ids, max_tokens, self.limits, self.positions)
            ids_list.append(ids)
        return ids_list

    async def completions(self, body: dict) -> dict:
        s = parse.sampling(body, self.limits)
        prompts = parse.prompts(body, self.limits)
        ids_list = self._prompt_ids(prompts, s["max_tokens"])
        echo, logprobs = parse.check_echo(body, s["max_tokens"])
        outs = await self.generate(ids_list, s)
        choices = []
        for k, out in enumerate(outs):
            p, text, lp = prompts[k // s["n"]], out.text, None
            if echo:
                ptext = p if isinstance(p, str) else self.backend.decode(p)
                text = ptext + text
                if logprobs is not None:
                    lp = self.echo_logprobs(ptext, ids_list[k // s["n"]])
            choices.append({"index": k, "text": text, "logprobs": lp, "finish_reason": out.finish_reason})
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name, "choices": choices, "usage": self.usage(sum(map(len, ids_list)), outs)}

    async def chat_completions(self, body: dict):
        s = parse.sampling(body, self.limits, default_max_tokens=None)
        messages = parse.messages(body)
        try:
            ids = self.backend.encode(self.backend.render(messages))
        except Exception as e:  # noqa: BLE001 - a template that rejects this conversation is a client error
            raise ApiError(400, f"cannot apply the chat template ({type(e).__name__})", param="messages") from None
        if s["max_tokens"] is None:
            s["max_tokens"] = max(min(self.limits.max_tokens, self.positions - len(ids)), 1)
        parse.check_prompt(ids, s["max_tokens"], self.limits, self.positions)
        outs = await self.generate([ids], s)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        use = self.usage(len(ids), outs)
        if body.get("stream"):
            return StreamingResponse(self._chat_events(rid, now, outs), media_type="text/event-stream")
        choices = [{"index": k, "message": {"role": "assistant", "content": out.text},
                    "finish_reason": out.finish_reason, "logprobs": None} for k, out in enumerate(outs)]
        return {"id": rid, "object": "chat.completion", "created": now, "model": self.name, "choices": choices,
                "usage": use}

    def _chat_events(self, rid: str, now: int, outs):
        """Server-sent events of a streamed chat answer: each choice whole in one chunk, then ``[DONE]``."""
        for k, out in enumerate(outs):
            for delta, reason in (({"role": "assistant", "content": out.text}, None), ({}, out.finish_reason)):
                chunk = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": self.name,
                         "choices": [{"index": k, "delta": delta, "finish_reason": reason}]}
                yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"


def _add_routes(app: FastAPI, svc: Service) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError):
        return _error(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):  # unknown routes, wrong methods
        return _error(e.status_code, str(e.detail), "invalid_request_error")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        svc.check_auth(request)
        return svc.models()

    @app.get("/stats")
    async def get_stats(request: Request):
        svc.check_auth(request)
        return svc.get_stats()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await svc.answer("/v1/completions", await svc.body(request))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await svc.answer("/v1/chat/completions", await svc.body(request))

    _add_batch_routes(app, svc)


def _add_batch_routes(app: FastAPI, svc: Service) -> None:
    """OpenAI's Files + Batch API (``serve.batch``); every route behind auth."""

    @app.post("/v1/files")
    async def upload(request: Request):
        svc.check_auth(request)
        lim = svc.runner.limits
        # The form's own fields and boundaries ride on top of the file: a little slack for them.
        raw = await parse.read_bytes(request, lim.max_upload_bytes + 4096, "upload")
        form = parse.multipart_form(raw, request.headers.get("content-type", ""))
        purpose = form.get("purpose", (None, b""))[1].decode("utf-8", "replace").strip()
        if purpose != "batch":
            raise ApiError(400, f"'purpose' must be 'batch', got {purpose[:40]!r}", param="purpose")
        if "file" not in form:
            raise ApiError(400, "'file' is required", param="file")
        filename, data = form["file"]
        if len(data) > lim.max_upload_bytes:
            raise ApiError(413, f"upload over {lim.max_upload_bytes} bytes", code="request_too_large")
        return svc.runner.store.put_file(data, (filename or "upload.jsonl")[:200], purpose)

    @app.get("/v1/files/{file_id}")
    async def file_meta(file_id: str, request: Request):
        svc.check_auth(request)
        return svc.runner.store.file(file_id)

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str, request: Request):
        svc.check_auth(request)
        return Response(svc.runner.store.content(file_id), media_type="application/jsonl")

    @app.post("/v1/batches")
    async def create_batch(request: Request):
        return svc.runner.create(await svc.body(request))

    @app.get("/v1/batches")
    async def list_batches(request: Request, limit: int = 20, after: str | None = None):
        svc.check_auth(request)
        return svc.runner.list(max(1, min(limit, 100)), after)

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str, request: Request):
        svc.check_auth(request)
        return svc.runner.store.batch(batch_id)

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, request: Request):
        svc.check_auth(request)
        return svc.runner.cancel(batch_id)


def make_app(backend, *, model_name: str | None = None, api_key: str | None = None, limits: Limits | None = None,
             files_dir: str | Path | None = None, batch_limits: BatchLimits | None = None) -> FastAPI:
    """The ASGI app serving ``backend`` (a ``FlaxBackend``) as ``model_name``.

    ``api_key``: when set, every ``/v1`` and ``/stats`` request needs ``Authorization: Bearer <key>``.
    ``files_dir``: where the Batch API keeps files and batches (default: a fresh temp dir, gone with
    the process; the CLI's ``--files-dir`` defaults to a persistent ``./serve_files``).
    """
    svc = Service(backend, model_name=model_name, api_key=api_key, limits=limits or Limits())
    if files_dir is None:
        files_dir = tempfile.mkdtemp(prefix="teams_rl_jax_serve_files_")
    svc.runner = BatchRunner(svc, Store(files_dir), batch_limits or BatchLimits())

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        svc.batcher.start()
        svc.runner.resume()  # batches a stopped server left unfinished
        yield
        await svc.runner.stop()
        await svc.batcher.stop()  # uvicorn has drained the in-flight requests; wait for any rows left

    app = FastAPI(title="teams-rl-jax OpenAI-compatible server", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    _add_routes(app, svc)
    app.state.batcher = svc.batcher
    return app
