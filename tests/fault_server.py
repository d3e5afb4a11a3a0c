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

Written with the standard library's ``http.server`` rather than FastAPI on purpose: dropping a
connection mid-request and sending a truncated body need raw control of the socket.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ATTEMPTS: dict[str, int] = {}
LOCK = threading.Lock()


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

    def do_POST(self):  # noqa: N802 - http.server's naming
        data = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        if self.headers.get("Authorization") != f"Bearer {os.environ['FAULT_SERVER_KEY']}":
            return self._send(401, b'{"error": {"message": "bad key", "type": "authentication_error"}}')
        chat = self.path.endswith("/chat/completions")
        prompt = data["messages"][-1]["content"] if chat else data["prompt"]
        plan_text, _, rest = prompt.partition("|")
        plan = plan_text.removeprefix("plan:").split(",")
        with LOCK:
            k = ATTEMPTS.get(prompt, 0)
            ATTEMPTS[prompt] = k + 1
        fault = plan[min(k, len(plan) - 1)]
        text = f"echo:{rest}"
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
            return self._send(429, b'{"error": {"message": "slow down"}}', {"Retry-After": "1"})
        if fault == "500":
            return self._send(500, b'{"error": {"message": "boom"}}')
        if fault == "slow":
            time.sleep(2.0)
            return self._send(200, body)
        if fault == "trunc":
            return self._send(200, body[: len(body) // 2])
        if fault == "drop":
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        return self._send(200, body)


def main() -> None:
    port = int(sys.argv[1])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
