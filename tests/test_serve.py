"""``python -m teams_rl_jax.serve`` as a real subprocess on loopback, driven by the ``openai`` backend and httpx.

Greedy completions over HTTP equal in-process ``generate`` token for token; 32 concurrent requests are
answered in fewer generate calls than requests; bearer auth and every limit give the right 4xx with an
OpenAI-shaped JSON error; the key never reaches the server's log.
"""

import os
import subprocess
import sys
import time

import httpx
import jax
import numpy as np
import pytest

import helpers
from hf_models import make_hf_model
from teams_rl_jax import generate
from teams_rl_jax.backends import QueryCounter, RoleConfig, build
from teams_rl_jax.data.chat import render_chat
from teams_rl_jax.errors import BackendError

MAX_NEW = 8
PROMPTS = ["Name three primary colors.", "Explain why the sky looks blue.", "Hello!"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    tok = helpers.make_tokenizer(tmp / "tok", vocab_size=300, bos=True)  # Llama-style: tokenizer(text) adds BOS
    _, path = make_hf_model(tmp, "llama3", seed=helpers.seed(5, "torch"), vocab_size=len(tok), initializer_range=0.5)
    tok.save_pretrained(str(path))
    key = "sk-" + helpers.rng(9, "key").bytes(16).hex()
    port = helpers.free_port()
    log = tmp / "server.log"
    env = {**os.environ, "H1_SERVE_KEY": key, "JAX_PLATFORMS": "cpu"}
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "teams_rl_jax.serve", "--checkpoint", str(path), "--port",
                                 str(port), "--api-key-env", "H1_SERVE_KEY", "--dtype", "float32", "--max-batch", "32",
                                 "--min-batch", "32", "--max-body-bytes", "20000",
                                 "--max-prompt-tokens", "48",
                                 "--max-tokens", "16", "--max-n", "2", "--log-level", "debug"],
                                env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start in 300 s"
            time.sleep(0.5)
        yield {"url": url, "key": key, "path": path, "log": log, "model": path.name}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _backend(server, monkeypatch, **kw):
    monkeypatch.setenv("H1_CLIENT_KEY", server["key"])
    cfg = RoleConfig(**{"backend": "openai", "base_url": server["url"] + "/v1", "model": server["model"],
                        "api_key_env": "H1_CLIENT_KEY", "timeout_s": 300.0, "max_retries": 0, **kw})
    return build(cfg, "expert", QueryCounter())


def _stats(server):
    r = httpx.get(server["url"] + "/stats", headers={"Authorization": f"Bearer {server['key']}"}, timeout=30)
    assert r.status_code == 200
    return r.json()


@pytest.fixture(scope="module")
def reference(server):
    """In-process greedy tokens for PROMPTS (+ the chat prompt): one left-padded batch through ``generate``."""
    from teams_rl_jax.data.tokenizer import load_tokenizer
    from teams_rl_jax.models import load_pretrained

    lm = load_pretrained(server["path"], "float32")
    tok = load_tokenizer(server["path"])
    texts = PROMPTS + [render_chat(tok, CHAT)]
    rows = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    T = max(map(len, rows))
    ids = np.zeros((len(rows), T), np.int32)
    mask = np.zeros((len(rows), T), np.int32)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = r, 1
    out = np.asarray(generate(lm, lm.params, ids, mask, max_new_tokens=MAX_NEW, rng=jax.random.key(0),
                              eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id))
    want = []
    for row in out.tolist():
        cut = row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row)
        want.append(row[:cut])
    return tok, rows, want


def test_greedy_over_http_equals_in_process_generate(server, reference, monkeypatch):
    """Mutations caught: server adds a second BOS / skips the chat template / cuts at pad / drops the
    left-padding mask in batched rows (texts or token counts differ); usage miscounted."""
    tok, rows, want = reference
    text_be = _backend(server, monkeypatch, chat=False)
    chat_be = _backend(server, monkeypatch, chat=True)
    got = text_be.complete(PROMPTS, max_new_tokens=MAX_NEW) + chat_be.complete([CHAT], max_new_tokens=MAX_NEW)
    for g, w in zip(got, want):
        assert g.text == tok.decode(w, skip_special_tokens=True), (g.text, w)
        assert g.finish_reason == ("length" if len(w) == MAX_NEW else "stop")
    # Token for token: usage counts the same tokens, and re-sending the prompt as ids gives the same text.
    h = {"Authorization": f"Bearer {server['key']}"}
    r = httpx.post(server["url"] + "/v1/completions", headers=h, timeout=300,
                   json={"model": server["model"], "prompt": rows[0], "max_tokens": MAX_NEW, "temperature": 0, "n": 2})
    body = r.json()
    n_out = 2 * len(want[0])
    assert r.status_code == 200
    assert body["usage"] == {"prompt_tokens": len(rows[0]), "completion_tokens": n_out,
                             "total_tokens": len(rows[0]) + n_out}
    assert [c["text"] for c in body["choices"]] == [got[0].text] * 2


def test_32_concurrent_requests_share_generate_calls(server, reference, monkeypatch):
    """Mutations caught: a batcher that runs one generate per request (calls == requests); batching that
    changes a greedy row's answer (rows mixed up or padding leaking); (continuous batching) an engine
    admitting one row per chunk."""
    tok, rows, want = reference
    be = _backend(server, monkeypatch, chat=False, max_concurrency=32)
    before = _stats(server)
    prompts = [PROMPTS[i % 3] if i % 4 == 0 else f"Write item number {i} of the list." for i in range(32)]
    t0 = time.monotonic()
    out = be.complete(prompts, max_new_tokens=MAX_NEW)
    elapsed = time.monotonic() - t0
    after = _stats(server)
    calls = after["batches"] - before["batches"]  # decode chunks; each request needs one (8 tokens, chunk 8)
    assert len(out) == 32 and after["requests"] - before["requests"] == 32
    assert calls < 32, f"{calls} decode chunks for 32 requests ({elapsed:.1f} s)"
    assert after["max_rows_per_call"] > 1
    for i, p in enumerate(prompts):
        if i % 4 == 0:
            assert out[i].text == tok.decode(want[PROMPTS.index(p)], skip_special_tokens=True)


def test_auth_and_limits_give_json_4xx(server, monkeypatch):
    """Mutations caught: auth skipped or comparing the wrong thing; any limit not enforced; FastAPI's
    default 422/500 instead of OpenAI-shaped 400s; the key written to the server's log."""
    url, key, model = server["url"], server["key"], server["model"]
    ok = {"Authorization": f"Bearer {key}"}
    assert httpx.get(url + "/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {key}"}):
        r = httpx.get(url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(url + "/v1/models", headers=ok)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == model

    def post(body=None, raw=None, path="/v1/completions"):
        return httpx.post(url + path, headers={**ok, "Content-Type": "application/json"}, timeout=60,
                          content=raw if raw is not None else __import__("json").dumps(body))

    base = {"model": model, "prompt": "Hello!", "max_tokens": 4}
    cases = [
        (post(raw=b'{"model": "x", '), 400, None),
        (post(raw=b"[1, 2]"), 400, None),
        (post({**base, "model": "other"}), 404, "model"),
        (post({**base, "prompt": "x" * 30000}), 413, None),
        (post({**base, "prompt": "Hello! " * 40}), 400, "prompt"),
        (post({**base, "prompt": [1, 2, 10 ** 6]}), 400, "prompt"),
        (post({**base, "max_tokens": 17}), 400, "max_tokens"),
        (post({**base, "n": 3}), 400, "n"),
        (post({**base, "temperature": "hot"}), 400, "temperature"),
        (post({**base, "stop": [1]}), 400, "stop"),
        (post({"model": model, "messages": "hi"}, path="/v1/chat/completions"), 400, "messages"),
        (post({"model": model, "messages": [{"role": "wizard", "content": "x"}]}, path="/v1/chat/completions"),
         400, "messages"),
        (httpx.get(url + "/v1/completions", headers=ok), 405, None),
        (httpx.get(url + "/v1/nothing", headers=ok), 404, None),
    ]
    for i, (r, status, param) in enumerate(cases):
        assert r.status_code == status, (i, r.status_code, r.text)
        err = r.json()["error"]
        assert err["message"] and (param is None or err["param"] == param), (i, err)
    # The openai backend turns a refused request into one BackendError, without retrying.
    be = _backend(server, monkeypatch, chat=False, max_retries=3)
    with pytest.raises(BackendError, match="HTTP 400"):
        be.complete(["Hello!"], max_new_tokens=17)
    assert be.retries == 0
    monkeypatch.setenv("H1_CLIENT_KEY", "sk-wrong")
    bad = build(RoleConfig(backend="openai", base_url=url + "/v1", model=model, api_key_env="H1_CLIENT_KEY"), "x")
    with pytest.raises(BackendError, match="HTTP 401"):
        bad.complete(["Hello!"], max_new_tokens=2)
    assert key not in server["log"].read_text()


@pytest.mark.slow  # optional feature (scoring over HTTP); ~25 s of extra compiles on the 2-core VM
def test_echo_logprobs_score_matches_in_process(server, monkeypatch):
    """Scoring over HTTP (echo + logprobs, max_tokens=0) equals the in-process backend's score.
    Mutations caught: offsets that count prompt tokens, a shifted log-prob column."""
    be = _backend(server, monkeypatch, chat=False)
    local = build(RoleConfig(checkpoint=str(server["path"]), dtype="float32", chat=False), "reviewer")
    prompts, conts = ["Name three primary", "The sky is"], [" colors.", " blue"]
    got, want = be.score(prompts, conts), local.score(prompts, conts)
    assert got == pytest.approx(want, abs=1e-4)
