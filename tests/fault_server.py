"""A fault-injecting OpenAI-compatible server for the ``openai`` backend's retry tests (loopback only).

Run as ``python tests/fault_server.py PORT``; it expects ``Authorization: Bearer $FAULT_SERVER_KEY``
(answers 401 otherwise) and prints ``ready`` once listening.

The prompt (or the last chat message) carries its own fault plan: ``"plan:429,500,ok|rest of prompt"``.
Attempt k of a given prompt gets ``plan[k]`` (the last entry repeats):

* ``ok``    200 with a completion whose text is ``"echo:<rest of prompt>"``
* ``429``   429 with ``Retry-After: 1``
* ``500``   500 with a JSON error body
* ``slow``  a correct reply after 2 s (longer than the test's client timeout)
* ``trunc`` 200, ``application/json``, the body cut in half (invalid JSON)
* ``drop``  the connection is closed without any reply
* ``wait``  a correct reply after 0.1 s (so that concurrent requests overlap: ``max_in_flight``)

A prompt without a ``plan:`` prefix is a generation request (the multi-process generate tests): the
reply is a deterministic function of the prompt, by the served model's name (``instructor``: a new
instruction, ``reviewer``: ``Not Equal``, else an answer), after ``$FAULT_SERVER_DELAY_S`` seconds.

Server-side accounting, for the tests' "no paid query repeated" and concurrency checks:
``GET /stats`` -> ``{"requests", "answered", "distinct_answered", "repeated" (bodies answered more than
once), "held", "in_flight", "max_in_flight"}``; ``POST /hold`` with ``{"on": true}`` holds every new
request unanswered (listed in ``held``) until ``{"on": false}``: a test kills a client while its request
is held, so that request was provably never answered to it.

Written with the standard library's ``http.server`` rather than FastAPI on purpose: dropping a
connection mid-request and sending a truncated body need raw control of the socket.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ATTEMPTS: dict[str, int] = {}
LOCK = threading.Lock()
ANSWERED: dict[str, int] = {}  # request body digest -> replies sent
STATE = {"requests": 0, "in_flight": 0, "max_in_flight": 0}
HELD: list[str] = []
HOLD = threading.Condition(LOCK)
HOLDING = [False]


def _digest(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _generated(model: str, prompt: str) -> str:
    """A deterministic reply of a generation request (see the module docstring)."""
    h = zlib.crc32(prompt.encode())
    if model == "instructor":
        return f"Explain topic {h % 100003} step by step, considering constraint {h % 97} and one example."
    if model == "reviewer":
        return "Not Equal"
    return f"A careful answer number {h} covering the request in detail, with reasons and an example."


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet: the test reads only "ready" from stdout
        pass

    def _send(self, status: int, body: bytes, headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        with LOCK:
            stats = {**STATE, "answered": sum(ANSWERED.values()), "distinct_answered": len(ANSWERED),
                     "repeated": sorted(k for k, n in ANSWERED.items() if n > 1), "held": list(HELD)}
        self._send(200, json.dumps(stats).encode())

    def do_POST(self):  # noqa: N802 - http.server's naming
        data = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        if self.path.endswith("/hold"):
            with HOLD:
                HOLDING[0] = bool(data["on"])
                HOLD.notify_all()
            return self._send(200, b"{}")
        if self.headers.get("Authorization") != f"Bearer {os.environ['FAULT_SERVER_KEY']}":
            return self._send(401, b'{"error": {"message": "bad key", "type": "authentication_error"}}')
        digest = _digest(data)
        with HOLD:
            STATE["requests"] += 1
            STATE["in_flight"] += 1
            STATE["max_in_flight"] = max(STATE["max_in_flight"], STATE["in_flight"])
            if HOLDING[0]:
                HELD.append(digest)
            while HOLDING[0]:
                HOLD.wait()
        try:
            sent = self._answer(data)
        finally:
            with LOCK:
                STATE["in_flight"] -= 1
        if sent:
            with LOCK:
                ANSWERED[digest] = ANSWERED.get(digest, 0) + 1

    def _answer(self, data: dict) -> bool:
        """Reply to one completion request; whether a 200 reply went out."""
        chat = self.path.endswith("/chat/completions")
        prompt = data["messages"][-1]["content"] if chat else data["prompt"]
        if not prompt.startswith("plan:"):
            time.sleep(float(os.environ.get("FAULT_SERVER_DELAY_S", "0")))
            plan, rest, k = ["ok"], "", 0
        else:
            plan_text, _, rest = prompt.partition("|")
            plan = plan_text.removeprefix("plan:").split(",")
            with LOCK:
                k = ATTEMPTS.get(prompt, 0)
                ATTEMPTS[prompt] = k + 1
        fault = plan[min(k, len(plan) - 1)]
        text = f"echo:{rest}" if prompt.startswith("plan:") else _generated(data["model"], prompt)
        if chat:
            reply = {"id": "x", "object": "chat.completion", "created": 0, "model": data["model"],
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        else:
            reply = {"id": "x", "object": "text_completion", "created": 0, "model": data["model"],
                     "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        body = json.dumps(reply).encode()
        if fault == "429":
            self._send(429, b'{"error": {"message": "slow down"}}', {"Retry-After": "1"})
            return False
        if fault == "500":
            self._send(500, b'{"error": {"message": "boom"}}')
            return False
        if fault in ("slow", "wait"):
            time.sleep(2.0 if fault == "slow" else 0.1)
        if fault == "trunc":
            self._send(200, body[: len(body) // 2])
            return False
        if fault == "drop":
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return False
        try:
            self._send(200, body)
        except OSError:  # the client is gone: nothing was delivered
            return False
        return True


def main() -> None:
    port = int(sys.argv[1])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
