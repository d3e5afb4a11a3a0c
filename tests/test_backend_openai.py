"""The ``openai`` backend against a real fault-injecting server process on loopback (tests/fault_server.py).

A batch survives 429 (Retry-After honoured), 500s, a reply slower than the timeout, truncated JSON and a
dropped connection; retries are counted; after the last retry there is ONE BackendError naming role,
model, host and status; the API key (random, from os.environ) is in no log line, error, repr or written file.
"""

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import helpers
from teams_rl_jax import config as config_lib
from teams_rl_jax.backends import QueryCounter, RoleConfig, build
from teams_rl_jax.errors import BackendError, ConfigError

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def fault_server():
    key = "sk-" + helpers.rng(7, "key").bytes(16).hex()  # a random key, as a real one would be
    port = helpers.free_port()
    env = {**os.environ, "FAULT_SERVER_KEY": key}
    proc = subprocess.Popen([sys.executable, str(HERE / "fault_server.py"), str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield f"http://127.0.0.1:{port}/v1", key
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def capture(tmp_path, caplog):
    """Every log record of every logger (our backend, openai, httpx) at DEBUG, in caplog AND a file."""
    caplog.set_level(logging.DEBUG)
    handler = logging.FileHandler(tmp_path / "run.log")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    yield tmp_path
    logging.getLogger().removeHandler(handler)
    handler.close()


def _cfg(url, **kw):
    base = dict(backend="openai", base_url=url, model="fault-model", api_key_env="H1_FAULT_KEY", chat=False,
                timeout_s=0.5, max_retries=3, backoff_s=0.01, max_backoff_s=2.0, max_concurrency=8)
    return config_lib.from_dict(RoleConfig, {**base, **kw}, "roles.instructor")


def _assert_key_absent(key, tmp_path, caplog, *texts):
    for rec in caplog.records:
        assert key not in rec.getMessage(), f"key leaked in log record of {rec.name}"
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert key not in path.read_text(errors="replace"), f"key leaked into {path}"
    for t in texts:
        assert key not in t


def test_batch_completes_through_every_fault(fault_server, capture, caplog, monkeypatch):
    """Mutations caught: not retrying truncated JSON / dropped connections / timeouts (the batch fails),
    ignoring Retry-After (elapsed < 1 s), not counting retries, logging the client's headers (key leak)."""
    url, key = fault_server
    monkeypatch.setenv("H1_FAULT_KEY", key)
    counter = QueryCounter()
    cfg = _cfg(url)
    backend = build(cfg, "instructor", counter)
    plans = {"429,ok": 1, "500,500,ok": 2, "slow,ok": 1, "trunc,ok": 1, "drop,ok": 1, "ok": 0}
    prompts = [f"plan:{p}|text batch {i}" for i, p in enumerate(plans)]
    t0 = time.monotonic()
    out = backend.complete(prompts, max_new_tokens=8)
    elapsed = time.monotonic() - t0
    assert [o.text for o in out] == [f"echo:text batch {i}" for i in range(len(plans))]
    assert all(o.finish_reason == "length" for o in out)
    assert backend.retries == sum(plans.values())
    assert counter.snapshot() == {"instructor": len(prompts)}
    assert elapsed >= 1.0, "Retry-After: 1 was not honoured"
    assert any("retry 1/3" in r.getMessage() for r in caplog.records), "retries were not logged"
    # Chat endpoint, same machinery.
    chat = build(_cfg(url, chat=True), "reviewer", counter)
    out = chat.complete([[{"role": "user", "content": "plan:500,ok|chat 1"}], "plan:trunc,ok|chat 2"],
                        max_new_tokens=4)
    assert [o.text for o in out] == ["echo:chat 1", "echo:chat 2"] and chat.retries == 2
    assert all(o.finish_reason == "stop" for o in out)
    assert counter.snapshot() == {"instructor": len(prompts), "reviewer": 2}
    config_lib.dump(cfg, capture / "resolved.yaml")  # a written config carries the variable's name only
    assert "H1_FAULT_KEY" in (capture / "resolved.yaml").read_text() or "api_key_env" in \
        (capture / "resolved.yaml").read_text()
    _assert_key_absent(key, capture, caplog, repr(backend), str(backend), repr(chat))


def test_one_clear_error_after_last_retry(fault_server, capture, caplog, monkeypatch):
    """Mutations caught: an extra/missing attempt (attempt count), a status-less or key-bearing message,
    retrying a 401 (the caller's fault)."""
    url, key = fault_server
    monkeypatch.setenv("H1_FAULT_KEY", key)
    backend = build(_cfg(url, max_retries=2), "instructor")
    with pytest.raises(BackendError) as e:
        backend.complete(["plan:500|always failing"], max_new_tokens=4)
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("instructor", "fault-model", "127.0.0.1", "status 500", "3 attempts"):
        assert part in msg, msg
    assert backend.retries == 2
    # The slow reply exhausts retries with a timeout message (and no status).
    with pytest.raises(BackendError, match="no reply within 0.5 s"):
        backend.complete(["plan:slow|always slow"], max_new_tokens=4)
    # A wrong key: 401 fails at once, no retries, and neither key is echoed.
    monkeypatch.setenv("H1_FAULT_KEY", "sk-wrong-" + key[::-1])
    bad = build(_cfg(url), "instructor")
    with pytest.raises(BackendError, match="HTTP 401") as e401:
        bad.complete(["plan:ok|x"], max_new_tokens=4)
    assert bad.retries == 0
    _assert_key_absent(key, capture, caplog, msg, str(e401.value))
    _assert_key_absent("sk-wrong-" + key[::-1], capture, caplog, str(e401.value))


def test_config_errors_name_the_key_not_the_secret(monkeypatch):
    """Mutations caught: dropping a validation rule; echoing a pasted key in the message."""
    with pytest.raises(ConfigError, match=r"roles.expert: base_url"):
        config_lib.from_dict(RoleConfig, {"backend": "openai", "model": "m"}, "roles.expert")
    with pytest.raises(ConfigError, match=r"roles.expert: model"):
        config_lib.from_dict(RoleConfig, {"backend": "openai", "base_url": "http://127.0.0.1:1/v1"}, "roles.expert")
    with pytest.raises(ConfigError, match=r"checkpoint"):
        config_lib.from_dict(RoleConfig, {"backend": "flax"}, "roles.instructor")
    pasted = "sk-" + helpers.rng(3, "pasted").bytes(8).hex()
    with pytest.raises(ConfigError) as e:
        config_lib.from_dict(RoleConfig, {"backend": "openai", "base_url": "http://x/v1", "model": "m",
                                          "api_key_env": pasted}, "roles.expert")
    assert pasted not in str(e.value) and "api_key_env" in str(e.value)
    monkeypatch.delenv("H1_UNSET_KEY", raising=False)
    with pytest.raises(ConfigError, match="H1_UNSET_KEY is not set"):
        build(RoleConfig(backend="openai", base_url="http://127.0.0.1:1/v1", model="m", api_key_env="H1_UNSET_KEY"),
              "expert")
