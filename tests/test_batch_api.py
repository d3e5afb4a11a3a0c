"""OpenAI's Batch API, both sides, over a real ``python -m teams_rl_jax.serve`` on loopback.

Server: the official ``openai`` client uploads a JSONL file, creates a batch, polls and downloads it;
greedy batch answers equal the live ``/v1/chat/completions`` answers; malformed lines (not JSON,
another endpoint, a duplicate custom_id, a body the live endpoint refuses) become error lines naming
their line number and custom_id while the rest completes; an oversized upload is a 413; a second
server over the same ``--files-dir`` still serves a finished batch.

Client: ``backend: openai_batch`` retries failed lines (the server's ``--batch-fail-once`` test hook
fails a marked line once), fails a line that fails every retry with one ``BackendError`` naming its
custom_id, and a generate stage whose batch was in flight when it died re-attaches to it on restart.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import helpers
import httpx
import pytest
from tiny_pipeline import ROOT, cpu_env, tiny_checkpoint

from teams_rl_jax.backends import QueryCounter, RoleConfig, RolesConfig, build
from teams_rl_jax.errors import BackendError, ConfigError

KEY_ENV, KEY = "H1_BATCH_KEY", "sk-batch-test-not-a-secret"
MODEL = "tiny-batch"
MARKER = "FAILONCE"
MAX_UPLOAD = 20000
CHAT = "/v1/chat/completions"


@contextlib.contextmanager
def serve(checkpoint: Path, files_dir: Path, log_path: Path, timeout_s: float = 240):
    """``python -m teams_rl_jax.serve`` with the Batch API's limits and test hook; yields its base URL."""
    port = helpers.free_port()
    log = open(log_path, "w")  # noqa: SIM115 - open for the server's lifetime, closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "teams_rl_jax.serve", "--checkpoint", str(checkpoint), "--port", str(port),
         "--dtype", "float32", "--model-name", MODEL, "--api-key-env", KEY_ENV, "--log-level", "warning",
         "--min-batch", "8", "--max-batch", "8", "--files-dir", str(files_dir),
         "--max-upload-bytes", str(MAX_UPLOAD), "--max-batch-lines", "40", "--max-tokens", "8",
         "--max-prompt-tokens", "1000", "--batch-fail-once", MARKER],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=cpu_env(**{KEY_ENV: KEY}))
    url = f"http://127.0.0.1:{port}"
    try:
        helpers.wait_for_http(f"{url}/health", proc, log_path, timeout_s)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=helpers.seed(3, "init"))


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    with serve(ckpt, tmp / "files", tmp / "server.log") as url:
        yield {"url": url, "files": tmp / "files", "log": tmp / "server.log", "ckpt": ckpt}


def _client(server):
    import openai

    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _stats(server) -> dict:
    return httpx.get(server["url"] + "/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()


def _line(cid, content, url=CHAT, **kw) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 6,
            "temperature": 0, **kw}
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def _wait(client, bid, timeout_s=120):
    deadline = time.time() + timeout_s
    while True:
        b = client.batches.retrieve(bid)
        if b.status in ("completed", "failed", "cancelled", "expired"):
            return b
        assert time.time() < deadline, f"batch {bid} still {b.status}"
        time.sleep(0.2)


def _rows(client, fid) -> list[dict]:
    return [json.loads(x) for x in client.files.content(fid).text.splitlines()] if fid else []


def _run_file(client, text: str):
    f = client.files.create(file=("in.jsonl", text.encode()), purpose="batch")
    assert client.files.retrieve(f.id).bytes == len(text.encode())
    b = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    assert b.status == "validating"
    return _wait(client, b.id)


PROMPTS = ["Name three primary colors.", "Explain why the sky looks blue.", "Hello there."]


def test_batch_equals_live_answers_and_survives_restart(server, tmp_path):
    """Upload, create, poll, download: each line's body equals the live endpoint's greedy answer; a
    second server over the same files dir serves the finished batch and its output, and re-runs a
    batch left in_progress.

    Mutations caught: lines answered by a second generation path (the prompt sent to /v1/completions
    without the chat template: texts differ); request_counts not updated at the end; the batch state
    kept per process (the second server answers 404); a restarted server not re-running the batches
    left in_progress."""
    client = _client(server)
    live = [client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=6,
                                           temperature=0) for p in PROMPTS]
    text = "".join(_line(f"req-{i}", p) + "\n" for i, p in enumerate(PROMPTS))
    b = _run_file(client, text)
    assert b.status == "completed" and b.error_file_id is None, b
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (3, 3, 0)
    rows = {r["custom_id"]: r for r in _rows(client, b.output_file_id)}
    assert sorted(rows) == ["req-0", "req-1", "req-2"]
    for i, want in enumerate(live):
        r = rows[f"req-{i}"]
        assert r["error"] is None and r["response"]["status_code"] == 200
        got = r["response"]["body"]
        assert got["choices"][0]["message"]["content"] == want.choices[0].message.content
        assert got["choices"][0]["finish_reason"] == want.choices[0].finish_reason
        assert got["usage"]["completion_tokens"] == want.usage.completion_tokens
    assert client.batches.list().data[0].id == b.id
    # A batch a stopped server left in_progress (its object as a crash leaves it on disk).
    cut = {**json.loads((server["files"] / "batches" / f"{b.id}.json").read_text()), "status": "in_progress",
           "id": "batch-" + "e" * 32, "output_file_id": None, "error_file_id": None, "completed_at": None}
    (server["files"] / "batches" / f"{cut['id']}.json").write_text(json.dumps(cut))
    # A restarted server (a second process over the same --files-dir) serves the finished batch and
    # re-runs the unfinished one.
    with serve(server["ckpt"], server["files"], tmp_path / "second.log") as url2:
        import openai

        c2 = openai.OpenAI(base_url=url2 + "/v1", api_key=KEY, max_retries=0, timeout=60)
        b2 = c2.batches.retrieve(b.id)
        assert b2.status == "completed" and b2.output_file_id == b.output_file_id
        assert c2.files.content(b.output_file_id).text == client.files.content(b.output_file_id).text
        b3 = _wait(c2, cut["id"], timeout_s=60)
        assert b3.status == "completed" and b3.request_counts.completed == 3
        redo = {r["custom_id"]: r["response"]["body"]["choices"] for r in _rows(c2, b3.output_file_id)}
        assert redo == {c: r["response"]["body"]["choices"] for c, r in rows.items()}


def test_malformed_lines_fail_alone_and_limits(server):
    """Not JSON, another endpoint, a duplicate custom_id and a body the live endpoint refuses each give
    an error line naming its line number and custom_id; the other lines complete. Over-sized upload:
    413; a file over --max-batch-lines: 400; unknown ids: 404; no key: 401.

    Mutations caught: duplicate custom_ids not detected (two output lines); the url not checked against
    the batch's endpoint; one refused line failing the whole batch (status failed, no output); the
    upload limit not enforced (200); auth skipped on GET /v1/batches/{id}."""
    client = _client(server)
    lines = [_line("a", "Hello there."), "{not json", _line("b", "Hi.", url="/v1/embeddings"),
             _line("a", "Same id again."), _line("c", "Too long", max_tokens=999), _line("d", "Name a color.")]
    b = _run_file(client, "\n".join(lines) + "\n")
    assert b.status == "completed"
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (6, 2, 4)
    assert sorted(r["custom_id"] for r in _rows(client, b.output_file_id)) == ["a", "d"]
    errs = _rows(client, b.error_file_id)
    got = [(e["error"]["line"], e["custom_id"], e["error"]["code"]) for e in errs]
    assert got == [(2, None, "invalid_json"), (3, "b", "invalid_url"), (4, "a", "duplicate_custom_id"),
                   (5, "c", "invalid_request_error")], got
    for e in errs:
        assert e["error"]["message"].startswith(f"line {e['error']['line']} ("), e
    assert "custom_id 'c'" in errs[3]["error"]["message"] and "max_tokens" in errs[3]["error"]["message"]
    assert errs[3]["response"]["status_code"] == 400
    import openai

    with pytest.raises(openai.APIStatusError) as e:
        client.files.create(file=("big.jsonl", b"x" * (MAX_UPLOAD + 1)), purpose="batch")
    assert e.value.status_code == 413 and "over" in e.value.message
    many = client.files.create(file=("many.jsonl", "".join(_line(f"m{i}", "x") + "\n" for i in range(41)).encode()),
                               purpose="batch")
    with pytest.raises(openai.BadRequestError, match="limit of 40"):
        client.batches.create(input_file_id=many.id, endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch-" + "0" * 32)
    with pytest.raises(openai.NotFoundError):
        client.files.content("../../etc/passwd")
    r = httpx.get(server["url"] + f"/v1/batches/{b.id}", timeout=10)
    assert r.status_code == 401


# ------------------------------------------------------------------------------------------ client
def _batch_cfg(server, **kw) -> RoleConfig:
    return RoleConfig(**{"backend": "openai_batch", "base_url": server["url"] + "/v1", "model": MODEL,
                         "api_key_env": KEY_ENV, "max_retries": 2, "batch_poll_s": 0.2, "batch_timeout_s": 120.0,
                         "max_new_tokens": 6, **kw})


def test_openai_batch_backend_retries_failed_lines(server, tmp_path, monkeypatch):
    """A line the server fails once is resubmitted in a second batch and answered; a line that fails
    every retry is one BackendError naming its custom_id and the server's error; queries count per
    prompt; plain-text prompts use /v1/completions; the key is not in the server's log.

    Mutations caught: failed lines not resubmitted (BackendError on the first run); resubmitting every
    line instead of the failed ones (the server answers the good line again); answers mapped back in
    arrival order instead of by custom_id (texts swapped, one missing)."""
    monkeypatch.setenv(KEY_ENV, KEY)
    counter = QueryCounter()
    be = build(_batch_cfg(server), "expert", counter, state_dir=tmp_path / "state")
    live = build(RoleConfig(backend="openai", base_url=server["url"] + "/v1", model=MODEL, api_key_env=KEY_ENV),
                 "expert")
    prompts = [[{"role": "user", "content": f"Say {MARKER} twice."}], [{"role": "user", "content": "Hello there."}],
               [{"role": "user", "content": "Hello there."}]]
    before = _stats(server)
    got = be.complete(prompts, max_new_tokens=6)
    want = live.complete(prompts[:2], max_new_tokens=6)
    assert [g.text for g in got] == [want[0].text, want[1].text, want[1].text]
    assert counter.snapshot() == {"expert": 3}
    assert be.retries == 1
    # Two distinct requests, each answered once (the duplicate prompt shares one line), + 2 live ones.
    assert _stats(server)["requests"] - before["requests"] == 2 + 2
    with pytest.raises(BackendError, match=r"custom_id \w+.*max_tokens") as e:
        be.complete(prompts[1:2], max_new_tokens=999)
    assert len(str(e.value).splitlines()) == 1
    # Plain-text prompts go to /v1/completions, one batch line each, with the live answers.
    text_be = build(_batch_cfg(server, chat=False), "expert", counter, state_dir=tmp_path / "state")
    text_live = build(RoleConfig(backend="openai", base_url=server["url"] + "/v1", model=MODEL, api_key_env=KEY_ENV,
                                 chat=False), "expert")
    assert [c.text for c in text_be.complete(["Hello there."], max_new_tokens=6)] == \
        [c.text for c in text_live.complete(["Hello there."], max_new_tokens=6)]
    assert KEY not in server["log"].read_text()


def test_openai_batch_only_where_answers_come_in_batches(monkeypatch):
    """``openai_batch`` outside the generate stage (no state dir: the policy stage's env) is a one-line
    ConfigError naming the key. Mutation caught: build() accepting openai_batch without a state dir."""
    cfg = RoleConfig(backend="openai_batch", base_url="http://127.0.0.1:9/v1", model="m")
    cfg.validate()
    with pytest.raises(ConfigError, match=r"^roles\.instructor\.backend: openai_batch"):
        build(cfg, "instructor")
    from teams_rl_jax.env.factory import build_env_roles

    with pytest.raises(ConfigError, match=r"roles\.reviewer\.backend"):
        build_env_roles(RolesConfig(reviewer=cfg))
    with pytest.raises(ConfigError, match="batch_poll_s"):
        RoleConfig(backend="openai_batch", base_url="http://x/v1", model="m", batch_poll_s=0).validate()


def test_generate_stage_reattaches_to_in_flight_batch(server, tmp_path, monkeypatch):
    """A generate stage whose expert (``openai_batch``) dies with its batch in flight (here: a poll
    timeout shorter than the batch, after the batch id was recorded) re-attaches to that batch on
    restart: no request file is sent twice and the server answers each request once.

    Mutations caught: the batch id not recorded before polling (the rerun creates a second batch
    for the same file); the state keyed by something other than the request file (a second upload
    and batch); the state file not read on start."""
    from teams_rl_jax.evolve import GenerateConfig, run_generate_stage

    monkeypatch.setenv(KEY_ENV, KEY)
    run = tmp_path / "run"
    cfg = GenerateConfig(selector="random", operator_role="expert", max_seeds=2, batch_seeds=2, steps=1,
                         drop_truncated=False, near_dup_threshold=None, baselines=(), progress=False, cache=True, seed=helpers.seed(0))
    client = _client(server)
    before_ids = {b.id for b in client.batches.list(limit=100).data}
    before = _stats(server)
    with pytest.raises(BackendError, match="re-attach"):
        run_generate_stage(cfg, run, RolesConfig(expert=_batch_cfg(server, batch_timeout_s=0.01)), log=lambda m: None)
    states = list((run / "cache" / "batches").glob("*.json"))
    assert len(states) == 1
    first = json.loads(states[0].read_text())["batch_id"]
    assert KEY not in states[0].read_text()
    run_generate_stage(cfg, run, RolesConfig(expert=_batch_cfg(server)), log=lambda m: None)
    new = [b for b in client.batches.list(limit=100).data if b.id not in before_ids]
    assert first in [b.id for b in new]
    inputs = [client.files.content(b.input_file_id).text for b in new]
    assert len(set(inputs)) == len(inputs), "a request file was sent in two batches"
    lines = sum(len(t.splitlines()) for t in inputs)
    # 2 rewrites, then an answer per kept rewrite (a sampled rewrite may be eliminated), the first batch among them
    assert len(new) >= 2 and lines >= 3
    assert _stats(server)["requests"] - before["requests"] == lines
    assert not list((run / "cache" / "batches").glob("*.json"))  # finished batches leave no state
