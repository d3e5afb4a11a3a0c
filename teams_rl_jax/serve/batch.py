"""OpenAI's Batch API on this server: ``/v1/files`` and ``/v1/batches``.

A client uploads a JSONL file (``purpose: batch``; one request a line: ``{"custom_id", "method":
"POST", "url", "body"}``), creates a batch over it, polls it, and downloads the output file. Each
line is answered by :meth:`Service.answer <teams_rl_jax.serve.app.Service.answer>`, the very
function behind the live ``/v1/completions`` and ``/v1/chat/completions`` (same parsing, same
limits, same ``Batcher.submit``): a batch is the live endpoints run from a file, with its lines in
flight together so the batcher groups them.

* Output file: one line per answered request, in input order: ``{"id", "custom_id", "response":
  {"status_code": 200, "request_id", "body"}, "error": null}``.
* Error file: one line per failed request: ``{"id", "custom_id", "response": {"status_code", "body"}
  or null, "error": {"code", "message", "line"}}``. The message names the line number and the
  custom_id. A line that is not JSON, has no string custom_id, repeats a custom_id, names another
  endpoint than the batch's, or has a body the live endpoint refuses fails alone; the rest runs.
* ``request_counts``: total (lines), completed (output lines), failed (error lines). Status
  ``validating`` -> ``in_progress`` -> ``completed`` (or ``cancelling`` -> ``cancelled``; ``failed``
  when the input file cannot be read at all).
* State on disk under ``files_dir`` (``files/<id>.json`` metadata + ``files/<id>.data``,
  ``batches/<id>.json``), each written to a temp file then renamed: a restarted server serves every
  finished batch and its files, and re-runs from the start any batch it was running when stopped.
* Limits: ``max_upload_bytes`` (413) and ``max_lines`` per batch (400 at ``POST /v1/batches``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path

from teams_rl_jax.serve.parse import ApiError

log = logging.getLogger(__name__)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
TERMINAL = ("completed", "failed", "cancelled", "expired")
_ID = re.compile(r"^(file|batch)-[0-9a-f]{32}$")


@dataclasses.dataclass(frozen=True)
class BatchLimits:
    max_upload_bytes: int = 100 << 20  # one uploaded file
    max_lines: int = 50_000            # requests in one batch (OpenAI's limit)
    concurrency: int = 256             # lines of one batch in flight at once (the batcher groups them)
    fail_once: str | None = None       # test hook: a line whose body holds this text fails once (500)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Store:
    """Files and batch objects under ``root`` (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.files = self.root / "files"
        self.batches = self.root / "batches"
        self.files.mkdir(parents=True, exist_ok=True)
        self.batches.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _check(kind: str, oid: str) -> None:
        m = _ID.match(oid)  # also keeps ids from naming paths outside the store
        if m is None or m.group(1) != kind:
            raise ApiError(404, f"no such {kind}: {oid[:80]}", code="not_found")

    def put_file(self, data: bytes, filename: str, purpose: str) -> dict:
        fid = f"file-{uuid.uuid4().hex}"
        meta = {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed"}
        _write_atomic(self.files / f"{fid}.data", data)
        _write_atomic(self.files / f"{fid}.json", json.dumps(meta).encode())  # metadata last: the file is whole
        return meta

    def file(self, fid: str) -> dict:
        self._check("file", fid)
        path = self.files / f"{fid}.json"
        if not path.is_file():
            raise ApiError(404, f"no such file: {fid}", code="not_found")
        return json.loads(path.read_text())

    def content(self, fid: str) -> bytes:
        self.file(fid)
        return (self.files / f"{fid}.data").read_bytes()

    def save(self, batch: dict) -> None:
        _write_atomic(self.batches / f"{batch['id']}.json", json.dumps(batch).encode())

    def batch(self, bid: str) -> dict:
        self._check("batch", bid)
        path = self.batches / f"{bid}.json"
        if not path.is_file():
            raise ApiError(404, f"no such batch: {bid}", code="not_found")
        return json.loads(path.read_text())

    def all_batches(self) -> list[dict]:
        out = [json.loads(p.read_text()) for p in self.batches.glob("batch-*.json")]
        return sorted(out, key=lambda b: (b["created_at"], b["id"]), reverse=True)


def _fail(no: int, cid, code: str, message: str, response: dict | None = None) -> dict:
    label = f"custom_id {cid!r}" if isinstance(cid, str) else "no custom_id"
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": cid if isinstance(cid, str) else None,
            "response": response,
            "error": {"code": code, "message": f"line {no} ({label}): {message}", "line": no}}


def validate_lines(data: bytes, endpoint: str) -> tuple[list[tuple[int, str, dict]], list[dict]]:
    """``(requests, error lines)`` of an input file: ``(line number, custom_id, body)`` for each
    well-formed line; an error line for each malformed one (numbered from 1, blank lines skipped)."""
    good, bad, seen = [], [], set()
    for no, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            req = json.loads(raw)
        except ValueError:
            bad.append(_fail(no, None, "invalid_json", "not a JSON object"))
            continue
        if not isinstance(req, dict):
            bad.append(_fail(no, None, "invalid_json", "not a JSON object"))
            continue
        cid = req.get("custom_id")
        if not isinstance(cid, str) or not cid:
            bad.append(_fail(no, cid, "missing_custom_id", "'custom_id' must be a non-empty string"))
        elif cid in seen:
            bad.append(_fail(no, cid, "duplicate_custom_id", "duplicate custom_id (each line needs its own)"))
        elif req.get("url") != endpoint:
            bad.append(_fail(no, cid, "invalid_url", f"url {str(req.get('url'))[:80]!r} is not this batch's "
                                                     f"endpoint {endpoint}"))
        elif str(req.get("method", "POST")).upper() != "POST":
            bad.append(_fail(no, cid, "invalid_method", "method must be POST"))
        elif not isinstance(req.get("body"), dict):
            bad.append(_fail(no, cid, "invalid_body", "'body' must be a JSON object"))
        else:
            good.append((no, cid, req["body"]))
        if isinstance(cid, str):
            seen.add(cid)
    return good, bad


class BatchRunner:
    """Creates, runs (one asyncio task per batch), cancels and resumes batches over a ``Service``."""

    def __init__(self, svc, store: Store, limits: BatchLimits):
        self.svc, self.store, self.limits = svc, store, limits
        self.tasks: dict[str, asyncio.Task] = {}
        self._failed_once: set[str] = set()

    # ---- lifecycle ------------------------------------------------------------------------------
    def resume(self) -> None:
        """On startup: re-run every batch a stopped server left unfinished (its answers were never written)."""
        for b in self.store.all_batches():
            if b["status"] == "cancelling":
                self._finish(b, "cancelled", [], [])
            elif b["status"] not in TERMINAL:
                log.info("batch %s: re-running after a restart", b["id"])
                self._start(b["id"])

    async def stop(self) -> None:
        for t in list(self.tasks.values()):
            t.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    def _start(self, bid: str) -> None:
        self.tasks[bid] = asyncio.get_running_loop().create_task(self._run(bid))
        self.tasks[bid].add_done_callback(lambda _t, bid=bid: self.tasks.pop(bid, None))

    # ---- endpoints ------------------------------------------------------------------------------
    def create(self, body: dict) -> dict:
        fid, endpoint, window = body.get("input_file_id"), body.get("endpoint"), body.get("completion_window")
        if not isinstance(fid, str):
            raise ApiError(400, "'input_file_id' is required", param="input_file_id")
        if endpoint not in ENDPOINTS:
            raise ApiError(400, f"'endpoint' must be one of {', '.join(ENDPOINTS)}", param="endpoint")
        if window != "24h":
            raise ApiError(400, "'completion_window' must be '24h'", param="completion_window")
        meta = self.store.file(fid)
        if meta["purpose"] != "batch":
            raise ApiError(400, f"file {fid} has purpose {meta['purpose']!r}, not 'batch'", param="input_file_id")
        lines = sum(1 for x in self.store.content(fid).splitlines() if x.strip())
        if lines > self.limits.max_lines:
            raise ApiError(400, f"file {fid} has {lines} requests, over the limit of {self.limits.max_lines} "
                                "per batch", param="input_file_id", code="too_many_requests")
        now = int(time.time())
        metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else None
        batch = {"id": f"batch-{uuid.uuid4().hex}", "object": "batch", "endpoint": endpoint, "errors": None,
                 "input_file_id": fid, "completion_window": "24h", "status": "validating", "output_file_id": None,
                 "error_file_id": None, "created_at": now, "in_progress_at": None, "expires_at": now + 86400,
                 "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
                 "cancelling_at": None, "cancelled_at": None,
                 "request_counts": {"total": lines, "completed": 0, "failed": 0}, "metadata": metadata}
        self.store.save(batch)
        self.svc.stats["batch_jobs"] = self.svc.stats.get("batch_jobs", 0) + 1
        self._start(batch["id"])
        return batch

    def cancel(self, bid: str) -> dict:
        batch = self.store.batch(bid)
        if batch["status"] in TERMINAL:
            return batch
        batch.update(status="cancelling", cancelling_at=int(time.time()))
        self.store.save(batch)
        task = self.tasks.get(bid)
        if task is not None:
            task.cancel()  # _run writes what was answered so far and marks the batch cancelled
        else:
            self._finish(batch, "cancelled", [], [])
        return batch

    def list(self, limit: int = 20, after: str | None = None) -> dict:
        items = self.store.all_batches()
        if after is not None:
            ids = [b["id"] for b in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        page = items[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}

    # ---- running --------------------------------------------------------------------------------
    async def _answer(self, no: int, cid: str, endpoint: str, body: dict, sem: asyncio.Semaphore) -> tuple[bool, dict]:
        async with sem:
            rid = f"batch_req_{uuid.uuid4().hex}"
            try:
                if self.limits.fail_once and self.limits.fail_once in json.dumps(body) \
                        and cid not in self._failed_once:
                    self._failed_once.add(cid)
                    raise RuntimeError("injected failure (--batch-fail-once)")
                out = await self.svc.answer(endpoint, body, stream_ok=False)
            except ApiError as e:
                err = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
                return False, _fail(no, cid, e.code or e.type, e.message, {"status_code": e.status,
                                                                         "request_id": rid, "body": err})
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - one line's failure must not stop the batch
                log.warning("batch line %d (%s) failed: %s", no, cid, type(e).__name__)
                err = {"error": {"message": f"server error ({type(e).__name__})", "type": "server_error",
                                 "param": None, "code": None}}
                return False, _fail(no, cid, "server_error", f"server error ({type(e).__name__}: {e})"[:300],
                                    {"status_code": 500, "request_id": rid, "body": err})
            return True, {"id": rid, "custom_id": cid, "response": {"status_code": 200, "request_id": rid,
                                                                     "body": out}, "error": None}

    async def _run(self, bid: str) -> None:
        try:
            await self._run_lines(bid)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a batch never stays in_progress forever
            log.exception("batch %s failed", bid)
            batch = self.store.batch(bid)
            batch["errors"] = {"object": "list", "data": [{"code": "server_error", "line": None, "param": None,
                                                           "message": f"server error ({type(e).__name__})"}]}
            self._finish(batch, "failed", [], [])

    async def _run_lines(self, bid: str) -> None:
        batch = self.store.batch(bid)
        try:
            data = self.store.content(batch["input_file_id"])
        except (ApiError, OSError) as e:
            batch["errors"] = {"object": "list", "data": [{"code": "file_not_found", "message": str(e)[:200],
                                                           "line": None, "param": "input_file_id"}]}
            self._finish(batch, "failed", [], [])
            return
        good, bad = validate_lines(data, batch["endpoint"])
        batch.update(status="in_progress", in_progress_at=int(time.time()))
        batch["request_counts"] = {"total": len(good) + len(bad), "completed": 0, "failed": len(bad)}
        self.store.save(batch)
        sem = asyncio.Semaphore(self.limits.concurrency)
        tasks = [asyncio.ensure_future(self._answer(no, cid, batch["endpoint"], body, sem)) for no, cid, body in good]
        try:
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            done = [t.result() for t in tasks if t.done() and not t.cancelled() and t.exception() is None]
            self._finish(batch, "cancelled", [r for ok, r in done if ok], bad + [r for ok, r in done if not ok])
            raise
        results = [t.result() for t in tasks]
        errors = sorted(bad + [r for ok, r in results if not ok], key=lambda r: r["error"]["line"])
        self._finish(batch, "completed", [r for ok, r in results if ok], errors)

    def _finish(self, batch: dict, status: str, outputs: list[dict], errors: list[dict]) -> None:
        now = int(time.time())
        if status != "failed":
            batch["finalizing_at"] = now

            def put(rows, kind):
                data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
                return self.store.put_file(data, f"{batch['id']}_{kind}.jsonl", "batch_output")["id"]

            batch["output_file_id"] = put(outputs, "output") if outputs else None
            batch["error_file_id"] = put(errors, "error") if errors else None
            batch["request_counts"] = {"total": batch["request_counts"]["total"], "completed": len(outputs),
                                       "failed": len(errors)}
        batch.update(status=status, **{f"{status}_at": now})
        self.store.save(batch)  # written last: a batch is "completed" only once its files are on disk
