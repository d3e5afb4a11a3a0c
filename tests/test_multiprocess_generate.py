"""Generation past one machine: real OS processes, a real loopback OpenAI-compatible server, kill -9.

* ``test_worker_mode_kill_restart_merge``: two ``python -m teams_rl_jax.train --worker I/2`` processes
  (no jax.distributed) with HTTP roles against ``tests/fault_server.py``; worker 1 is killed (SIGKILL)
  while the server holds its request unanswered, restarted, and the last worker to finish merges.
  Checked: every seed's records exactly once in ``generated.jsonl``; server-side, no answered request
  was asked again except the ones held (never delivered) when the worker died; the summary's paid
  count equals the distinct requests the server answered (it reads both workers' cache files);
  ``--worker merge`` rewrites byte-identical files (twice); a later worker of another worker count,
  with the same cache dir, pays nothing (it reads the other workers' files).
  Mutations tried (each made this test fail): ``ResponseCache._other_dbs`` returning [] (lookups ignore
  the other workers' files); ``paid_by_role`` counting its own file only; ``cache_store`` giving every
  worker the one shared ``responses.sqlite``; the done marker written before the loop (worker 0 merges
  while worker 1 is down); ``_merge`` reading shard 0 only; ``_process`` ignoring ``generate.worker``;
  the merge appending to ``generated.jsonl`` instead of rebuilding it (not idempotent), which at first
  survived because ``--worker merge`` was skipped on a complete stage (fixed: ``run_stage(rerun=)``).
* ``test_jax_distributed_generate_matches_single_process``: the same stage as a 2-process
  ``jax.distributed`` group (gloo on the CPU); its merged records equal a single-process run's
  (same seeds, deterministic server), and each process wrote only its own cache file.
  Mutations tried (each failed it): ``_process`` ignoring jax (both processes do every seed);
  ``_merge`` reading shard 0 only (records missing).

Seeds: the bundled seed file (first 8), the selector ``random`` (seeded per seed and step), the server
deterministic; nothing else is random.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

import helpers
import tiny_pipeline as T

HERE = Path(__file__).parent
KEY = "test-key-not-a-secret"
SEEDS = 8


@pytest.fixture
def server():
    """A fresh fault server (its counters start at 0); yields its port."""
    port = helpers.free_port()
    env = {**os.environ, "FAULT_SERVER_KEY": KEY, "FAULT_SERVER_DELAY_S": "0.04"}
    proc = subprocess.Popen([sys.executable, str(HERE / "fault_server.py"), str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield port
    finally:
        proc.kill()
        proc.wait()


def stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as r:
        return json.loads(r.read())


def hold(port: int, on: bool) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/hold", data=json.dumps({"on": on}).encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).read()


def write_config(path: Path, port: int, cache_dir: Path) -> Path:
    role = lambda name: {"backend": "openai", "base_url": f"http://127.0.0.1:{port}/v1", "model": name,  # noqa: E731
                         "api_key_env": "FAULT_SERVER_KEY", "max_concurrency": 2, "max_new_tokens": 32,
                         "timeout_s": 60.0}
    cfg = {"roles": {r: role(r) for r in ("instructor", "reviewer", "expert")},
           "generate": {"selector": "random", "protocol": "filtered", "steps": 2, "batch_seeds": 1,
                        "max_seeds": SEEDS, "near_dup_threshold": None, "baselines": [], "progress": False,
                        "operator_role": "instructor", "cache_dir": str(cache_dir)}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(cfg: Path, run: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "teams_rl_jax.train", "--config", str(cfg), "--run-dir", str(run),
                             *args], env=env or T.cpu_env(FAULT_SERVER_KEY=KEY), cwd=T.ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def check_records_once(data: Path) -> list[dict]:
    """Every seed done once (one progress line), each seed's records exactly once in the merge."""
    progress = [p for f in sorted((data / "shards").glob("progress.*.jsonl")) for p in lines(f)]
    ids = [p["seed_id"] for p in progress]
    assert len(ids) == len(set(ids)) == SEEDS, sorted(ids)
    merged = lines(data / "generated.jsonl")
    keys = [(r["meta"]["seed_id"], r["meta"]["step"]) for r in merged]
    assert len(keys) == len(set(keys)), "a record appears twice in the merge"
    per_seed = {i: 0 for i in ids}
    for r in merged:
        per_seed[r["meta"]["seed_id"]] += 1
    assert per_seed == {p["seed_id"]: p["records"] for p in progress}
    assert sum(per_seed.values()) > SEEDS  # the run made records (2 steps each, most kept)
    return merged


def test_worker_mode_kill_restart_merge(tmp_path, server):
    """See the module docstring (worker mode)."""
    cache = tmp_path / "cache"
    cfg = write_config(tmp_path / "cfg.yaml", server, cache)
    run = tmp_path / "run"
    data = run / "data"
    w0 = train(cfg, run, "--worker", "0/2")
    w1 = train(cfg, run, "--worker", "1/2")
    prog1 = data / "shards" / "progress.00001.jsonl"
    deadline = time.time() + 90
    while not lines(prog1):
        assert w1.poll() is None, f"worker 1 ended before the kill: {w1.communicate()[0][-2000:]}"
        assert time.time() < deadline, "worker 1 wrote no progress line in 90 s"
        time.sleep(0.02)
    hold(server, True)  # every request from now on waits unanswered
    deadline = time.time() + 30
    while len(stats(server)["held"]) < (2 if w0.poll() is None else 1):
        assert time.time() < deadline, stats(server)
        time.sleep(0.02)
    w1.send_signal(signal.SIGKILL)
    w1.wait()
    held_at_kill = set(stats(server)["held"])
    hold(server, False)
    assert len(lines(prog1)) < SEEDS // 2, "worker 1 had finished: the kill tested nothing"
    out = finish(w0)  # worker 0 ends while worker 1 is down: it must not merge
    assert "waiting for workers 1" in out and not (data / "generated.jsonl").exists(), out[-2000:]
    finish(train(cfg, run, "--worker", "1/2"))  # the restarted worker finishes last and merges

    merged = check_records_once(data)
    st = stats(server)
    assert set(st["repeated"]) <= held_at_kill, (st, held_at_kill)  # only never-delivered requests again
    summary = json.loads((data / "summary.json").read_text())
    assert summary["seeds_done"] == SEEDS
    assert sum(summary["paid"].values()) == st["distinct_answered"], (summary["paid"], st)
    assert sorted(p.name for p in cache.iterdir() if p.suffix == ".sqlite") == \
        ["responses.00000.sqlite", "responses.00001.sqlite"]  # each worker its own file, no shared one
    assert (run / ".stages" / "generate.json").is_file()  # the merging worker marked the stage complete

    before = {f: (data / f).read_bytes() for f in ("generated.jsonl", "trace.jsonl")}
    for _ in range(2):  # the merge is idempotent
        out = finish(train(cfg, run, "--worker", "merge"))
        assert "[generate:random] kept" in out, out[-2000:]  # it merged (a complete stage is not skipped)
        assert {f: (data / f).read_bytes() for f in before} == before
    assert len(lines(data / "generated.jsonl")) == len(merged)

    # Another worker count over the same cache dir: seeds of the old worker 0 are read from its file.
    asked = st["requests"]
    run2 = tmp_path / "run2"
    out = finish(train(cfg, run2, "--worker", "1/3"))
    assert "waiting for workers 0, 2" in out
    assert len(lines(run2 / "data" / "shards" / "progress.00001.jsonl")) == 3
    assert stats(server)["requests"] == asked, "a query already paid by another worker was asked again"


def test_jax_distributed_generate_matches_single_process(tmp_path, server):
    """See the module docstring (jax.distributed)."""
    cfg = write_config(tmp_path / "cfg.yaml", server, tmp_path / "unused")
    port = helpers.free_port()
    procs = [train(cfg, tmp_path / "dist", "--stages", "generate", "--set", f"generate.cache_dir={tmp_path / 'c2'}",
                   env=T.cpu_env(FAULT_SERVER_KEY=KEY, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                 JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    single = train(cfg, tmp_path / "single", "--stages", "generate",
                   "--set", f"generate.cache_dir={tmp_path / 'c1'}")
    for p in [*procs, single]:
        finish(p, timeout=180)
    key = lambda r: (r["meta"]["seed_id"], r["meta"]["step"])  # noqa: E731
    dist = sorted(check_records_once(tmp_path / "dist" / "data"), key=key)
    one = sorted(check_records_once(tmp_path / "single" / "data"), key=key)
    assert dist == one
    assert sorted(p.name for p in (tmp_path / "c2").glob("*.sqlite")) == \
        ["responses.00000.sqlite", "responses.00001.sqlite"]
    assert [p.name for p in (tmp_path / "c1").glob("*.sqlite")] == ["responses.sqlite"]
    s1, s2 = (json.loads((tmp_path / d / "data" / "summary.json").read_text()) for d in ("single", "dist"))
    assert s1["kept"] == s2["kept"] and s1["queries"] == s2["queries"] and s1["paid"] == s2["paid"]


def test_worker_spec():
    """``generate.worker``: I/N, the SLURM array's index, merge; one-line errors naming the key."""
    from teams_rl_jax.errors import ConfigError
    from teams_rl_jax.evolve.config import worker_spec

    assert worker_spec("2/5", {}) == (2, 5) and worker_spec("merge", {}) is None
    env = {"SLURM_ARRAY_TASK_ID": "13", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert worker_spec("slurm", env) == (3, 4)
    for bad, env in (("2/2", {}), ("x", {}), ("1/0", {}), ("slurm", {})):
        with pytest.raises(ConfigError, match=r"^generate\.worker: ") as e:
            worker_spec(bad, env)
        assert "\n" not in str(e.value)
